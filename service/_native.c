/* service._native: the transform's per-record path in C, for the common records.
 *
 * Why: in Python the transform is ~40 interpreter-level operations per record (parse into
 * a dict, shape key, checks, month, seal, pseudonyms, two outputs) and costs ~10x an
 * orjson round trip on a machine where every new object touched is expensive
 * (docs/benchmarks.md). This module does the same work for one record without building a
 * Python object per field: it scans the JSON in place, checks the fields against tables
 * compiled from the policy, and writes both outputs directly.
 *
 * The contract with service/transform.py (the reference, and the only path for anything
 * unusual): for every record this code does not *decline*, its outputs are byte for byte
 * what the Python path writes (the sealed blob aside, which is random by construction and
 * opens with the same key to the same identifiers). It declines, and leaves the record to
 * the Python path, whenever a record is outside the subset it can prove equal:
 *   - not a flat object of strings, numbers, true/false/null; nested values;
 *   - any byte outside printable ASCII, any backslash (escapes, non-ASCII text: orjson's
 *     canonical re-encoding of those is not a byte copy);
 *   - numbers whose canonical (orjson) spelling might differ from the input's: exponents,
 *     "-0", integers over 18 digits, decimals over 15 significant digits, trailing zeros,
 *     more than 4 leading fractional zeros;
 *   - a repeated key, a failed check of any kind (rejections are always written by the
 *     Python path, with its messages), an event time not in
 *     "YYYY-MM-DDTHH:MM:SS[.fff]" + "Z" or "+HH:MM"/"-HH:MM" (the month is then the UTC
 *     one, the reference zone; any other zone keeps the engine off) or non-negative epoch
 *     milliseconds, an instant outside years 1970-9999 in UTC for an offset time, a month
 *     whose identifiers are stripped.
 * tests/unit/test_native.py holds the equality to the Python path, record by record.
 *
 * Crypto is OpenSSL's libcrypto (the library `cryptography` itself wraps): AES-256-GCM
 * and HMAC-SHA256 through EVP, SHA-256 through its SHA256_* functions (see sha256_parts),
 * keyed with what service/monthkeys.py and
 * service/sealing.py derive with `cryptography` (HKDF). Nothing is hand-made here.
 * Keys live in OpenSSL contexts for one batch and are freed (and cleansed by OpenSSL)
 * when the batch ends.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/sha.h>
#include <string.h>

/* SHA-256 of short inputs (Merkle leaves and nodes, billing documents) through OpenSSL's
 * SHA256_* functions: the same implementation (SHA-NI where the CPU has it) without the
 * EVP layer's per-call dispatch, which was ~0.45 us of each hash here (the EVP path:
 * 0.9 s for a 1M-leaf tree). Deprecated in OpenSSL 3.0 in favour of EVP, still shipped;
 * the build silences the warning for these calls only. */
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif
static inline void
sha256_parts(const void *a, size_t an, const void *b, size_t bn, const void *c, size_t cn,
             unsigned char out[32])
{
    SHA256_CTX ctx;
    SHA256_Init(&ctx);
    if (an) SHA256_Update(&ctx, a, an);
    if (bn) SHA256_Update(&ctx, b, bn);
    if (cn) SHA256_Update(&ctx, c, cn);
    SHA256_Final(out, &ctx);
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

#define T_STR 1
#define T_INT 2
#define T_FLOAT 4
#define T_NULL 8
#define T_BOOL 16
#define T_ANY 31

enum { C_NONE, C_CDR_ID, C_ACCOUNT, C_NONNEG, C_CURRENCY, C_MCC, C_MNC, C_COUNTRY };
enum { K_MSISDN, K_IMSI, K_IMEI, K_EMAIL, K_OPAQUE };

#define MAX_FIELDS 64
#define MAX_SPECS 64
#define MAX_GENERAL 8
#define MAX_CTX 32
#define PSEUDONYM_BYTES 16

typedef struct {
    char *name;
    Py_ssize_t nlen;
    int ident;     /* 0: billing, 1: identifier */
    int types;     /* billing: allowed value types */
    int check;     /* billing: C_* */
    int kind;      /* identifier: K_* */
    int keep_domain;
    int gen;       /* identifier: index of its generalised field, or -1 */
    char *mac_prefix; Py_ssize_t mac_len;   /* "msisdn\0" */
    char *gen_key; Py_ssize_t gen_len;      /* ',"msisdn_cc":' or "" */
    char *pkey; Py_ssize_t pkey_len;        /* ',"msisdn_pseudonym":"' */
    char *jname; Py_ssize_t jname_len;      /* '"msisdn":' for the sealed plaintext */
} Spec;

typedef struct {
    const char *key; Py_ssize_t klen;
    const char *val; Py_ssize_t vlen;   /* the token; strings without their quotes */
    int type;
    int spec;                            /* index in specs, or -1 (dropped) */
} Field;

typedef struct {
    char month[7];
    int cls;
    int declined;        /* identifiers stripped, or no key: the Python path writes these */
    PyObject *month_str;
    PyObject *head;      /* ',"month":"2026-10","key_id":"2026-10/default"' */
    long long billing_until_ms;
    EVP_CIPHER_CTX *aead;
    EVP_MAC_CTX *mac;
    unsigned char header[2 + 255 + 16];
    Py_ssize_t header_len;
    char *aad; Py_ssize_t aad_prefix_len, aad_cap;
    unsigned long long counter;
    PyObject *leaves;    /* the month's leaf hashes (bytearray, shared by its classes), or NULL */
} Ctx;

typedef struct {
    PyObject_HEAD
    Spec specs[MAX_SPECS];
    int nspecs;
    int idx_cdr_id, idx_account, idx_event_time, idx_country;
    PyObject *absent[1 << MAX_GENERAL];   /* bytes per mask of generalised fields present */
    int ngeneral;
    unsigned char countries[26 * 26];     /* 1: an ISO 3166-1 code the country check takes */
    unsigned char class_of[26 * 26];      /* retention class index by country, 0 = default */
    unsigned char cc[4][1000];            /* calling codes by length */
    unsigned char mnc3[1000];             /* MCCs whose MNC has three digits */
    Py_ssize_t max_bytes;
    char *buf; Py_ssize_t cap;            /* scratch for one output document */
    int rank[MAX_SPECS];                  /* each field's place in byte order of names */
} Engine;

static EVP_CIPHER *g_gcm;
static EVP_MAC *g_hmac;

/* ---------------------------------------------------------------- engine set-up */

static void
engine_dealloc(Engine *self)
{
    for (int i = 0; i < self->nspecs; i++) {
        Spec *s = &self->specs[i];
        PyMem_Free(s->name); PyMem_Free(s->mac_prefix); PyMem_Free(s->gen_key);
        PyMem_Free(s->pkey); PyMem_Free(s->jname);
    }
    for (int i = 0; i < (1 << MAX_GENERAL); i++) Py_CLEAR(self->absent[i]);
    PyMem_Free(self->buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static char *
copy_bytes(PyObject *b, Py_ssize_t *len)
{
    char *p; Py_ssize_t n;
    if (PyBytes_AsStringAndSize(b, &p, &n) < 0) return NULL;
    char *out = PyMem_Malloc(n + 1);
    if (!out) { PyErr_NoMemory(); return NULL; }
    memcpy(out, p, n); out[n] = 0; *len = n;
    return out;
}

static int
fill_table(unsigned char *table, PyObject *seq, int width)
{
    /* seq: strings; those of `width` digits set their entry */
    PyObject *it = PyObject_GetIter(seq), *item;
    if (!it) return -1;
    while ((item = PyIter_Next(it))) {
        Py_ssize_t n; const char *s = PyUnicode_AsUTF8AndSize(item, &n);
        if (!s) { Py_DECREF(item); Py_DECREF(it); return -1; }
        if (n == width) {
            int v = 0, ok = 1;
            for (int i = 0; i < n; i++) {
                if (s[i] >= '0' && s[i] <= '9') v = v * 10 + (s[i] - '0');
                else ok = 0;
            }
            if (ok) table[v] = 1;
        }
        Py_DECREF(item);
    }
    Py_DECREF(it);
    return PyErr_Occurred() ? -1 : 0;
}

static int
letters2(const char *s, Py_ssize_t n)
{
    if (n != 2 || s[0] < 'A' || s[0] > 'Z' || s[1] < 'A' || s[1] > 'Z') return -1;
    return (s[0] - 'A') * 26 + (s[1] - 'A');
}

/* Engine(specs, absent, countries, class_of, calling_codes, mnc3_mccs, max_bytes)
 *   specs: tuple of (name: bytes, ident: bool, types: int, check: int, kind: int,
 *          keep_domain: bool, gen: int, mac_prefix: bytes, gen_key: bytes, pkey: bytes,
 *          jname: bytes)
 *   absent: tuple of 2**ngeneral bytes, by mask of the generalised fields present
 *   countries: codes the country check accepts; class_of: dict code -> class index
 *   calling_codes: E.164 codes as digit strings; mnc3_mccs: MCCs with 3-digit MNCs */
static int
engine_init(Engine *self, PyObject *args, PyObject *kw)
{
    PyObject *specs, *absent, *countries, *class_of, *codes, *mnc3;
    Py_ssize_t max_bytes;
    if (!PyArg_ParseTuple(args, "O!O!OO!OOn", &PyTuple_Type, &specs, &PyTuple_Type, &absent,
                          &countries, &PyDict_Type, &class_of, &codes, &mnc3, &max_bytes))
        return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(specs);
    if (n > MAX_SPECS) { PyErr_SetString(PyExc_ValueError, "too many policy fields"); return -1; }
    self->idx_cdr_id = self->idx_account = self->idx_event_time = self->idx_country = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PyTuple_GET_ITEM(specs, i), *name, *mp, *gk, *pk, *jn;
        Spec *s = &self->specs[i];
        int ident, keep;
        if (!PyArg_ParseTuple(t, "SpiiipiSSSS", &name, &ident, &s->types, &s->check, &s->kind,
                              &keep, &s->gen, &mp, &gk, &pk, &jn))
            return -1;
        s->ident = ident; s->keep_domain = keep;
        if (!(s->name = copy_bytes(name, &s->nlen)) || !(s->mac_prefix = copy_bytes(mp, &s->mac_len))
            || !(s->gen_key = copy_bytes(gk, &s->gen_len)) || !(s->pkey = copy_bytes(pk, &s->pkey_len))
            || !(s->jname = copy_bytes(jn, &s->jname_len)))
            return -1;
        self->nspecs = (int)i + 1;
        if (s->gen >= MAX_GENERAL) { PyErr_SetString(PyExc_ValueError, "too many generalised fields"); return -1; }
        if (!ident) {
            if (s->nlen == 6 && !memcmp(s->name, "cdr_id", 6)) self->idx_cdr_id = (int)i;
            if (s->nlen == 10 && !memcmp(s->name, "account_id", 10)) self->idx_account = (int)i;
            if (s->nlen == 10 && !memcmp(s->name, "event_time", 10)) self->idx_event_time = (int)i;
            if (s->nlen == 7 && !memcmp(s->name, "country", 7)) self->idx_country = (int)i;
        }
    }
    /* byte order = code point order for ASCII names: orjson's OPT_SORT_KEYS */
    for (int i = 0; i < self->nspecs; i++) {
        int r = 0;
        for (int j = 0; j < self->nspecs; j++) {
            const Spec *a = &self->specs[j], *b = &self->specs[i];
            Py_ssize_t m = a->nlen < b->nlen ? a->nlen : b->nlen;
            int c = memcmp(a->name, b->name, m);
            if (c < 0 || (c == 0 && a->nlen < b->nlen)) r++;
        }
        self->rank[i] = r;
    }
    Py_ssize_t na = PyTuple_GET_SIZE(absent);
    if (na < 1 || na > (1 << MAX_GENERAL) || (na & (na - 1))) {
        PyErr_SetString(PyExc_ValueError, "absent: one entry per mask"); return -1;
    }
    for (Py_ssize_t i = 0; i < na; i++) {
        PyObject *b = PyTuple_GET_ITEM(absent, i);
        if (!PyBytes_Check(b)) { PyErr_SetString(PyExc_TypeError, "absent: bytes"); return -1; }
        Py_INCREF(b); Py_XSETREF(self->absent[i], b);
    }
    memset(self->countries, 0, sizeof self->countries);
    memset(self->class_of, 0, sizeof self->class_of);
    memset(self->cc, 0, sizeof self->cc);
    memset(self->mnc3, 0, sizeof self->mnc3);
    {
        PyObject *it = PyObject_GetIter(countries), *item;
        if (!it) return -1;
        while ((item = PyIter_Next(it))) {
            Py_ssize_t l; const char *c = PyUnicode_AsUTF8AndSize(item, &l);
            int v = c ? letters2(c, l) : -1;
            if (v >= 0) self->countries[v] = 1;
            Py_DECREF(item);
            if (!c) { Py_DECREF(it); return -1; }
        }
        Py_DECREF(it);
        if (PyErr_Occurred()) return -1;
    }
    {
        PyObject *k, *v; Py_ssize_t pos = 0;
        while (PyDict_Next(class_of, &pos, &k, &v)) {
            Py_ssize_t l; const char *c = PyUnicode_AsUTF8AndSize(k, &l);
            if (!c) return -1;
            int idx = letters2(c, l);
            long cls = PyLong_AsLong(v);
            if (cls == -1 && PyErr_Occurred()) return -1;
            if (idx < 0 || cls < 1 || cls > 255) {
                PyErr_SetString(PyExc_ValueError, "class_of: two capital letters -> 1..255"); return -1;
            }
            self->class_of[idx] = (unsigned char)cls;
        }
    }
    for (int w = 1; w <= 3; w++)
        if (fill_table(self->cc[w], codes, w) < 0) return -1;
    if (fill_table(self->mnc3, mnc3, 3) < 0) return -1;
    self->max_bytes = max_bytes;
    return 0;
}

/* ---------------------------------------------------------------- JSON scanning */

/* 1 for the bytes a string may hold here: printable ASCII but '"' and '\\'. */
static unsigned char PLAIN[256];

static inline const char *
skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) p++;
    return p;
}

static inline const char *
scan_string(const char *p, const char *end)
{
    /* p just past the opening quote; returns the closing quote, or NULL to decline */
    while (p < end && PLAIN[(unsigned char)*p]) p++;
    if (p >= end || *p != '"') return NULL;
    return p;
}

/* A number token whose orjson spelling is certainly the token itself; sets *type.
 * Returns the end of the token, or NULL to decline. */
static const char *
scan_number(const char *p, const char *end, int *type)
{
    int neg = 0;
    if (p < end && *p == '-') { neg = 1; p++; }
    const char *ip = p;
    if (p >= end || *p < '0' || *p > '9') return NULL;
    if (*p == '0') p++;
    else while (p < end && *p >= '0' && *p <= '9') p++;
    Py_ssize_t ilen = p - ip;
    if (p < end && (*p == 'e' || *p == 'E')) return NULL;
    if (p < end && *p == '.') {
        const char *fp = ++p;
        while (p < end && *p >= '0' && *p <= '9') p++;
        Py_ssize_t flen = p - fp;
        if (flen == 0) return NULL;
        if (p < end && (*p == 'e' || *p == 'E')) return NULL;
        /* orjson writes the shortest round-trip form: equal to the token when the token
         * has at most 15 significant digits (DBL_DIG), no trailing zero (but "x.0"),
         * and no more than 4 leading fractional zeros (0.00001 and 1.23e-6 otherwise) */
        if (!(flen == 1 && fp[0] == '0') && fp[flen - 1] == '0') return NULL;
        Py_ssize_t sig;
        if (ilen == 1 && ip[0] == '0') {
            if (flen == 1 && fp[0] == '0') sig = 0;
            else {
                Py_ssize_t lead = 0;
                while (lead < flen && fp[lead] == '0') lead++;
                if (lead > 4) return NULL;
                sig = flen - lead;
            }
        } else {
            sig = ilen + ((flen == 1 && fp[0] == '0') ? 0 : flen);
        }
        if (sig > 15 || ilen > 15) return NULL;
        *type = T_FLOAT;
        return p;
    }
    if (ilen > 18) return NULL;
    if (neg && ilen == 1 && ip[0] == '0') return NULL;   /* "-0" is written "0" */
    *type = T_INT;
    return p;
}

/* Scans a flat JSON object of the subset (see the top of this file) into fields; keys are
 * not checked for repeats here. Returns 0 to decline. */
static int
scan_object(const char *raw, Py_ssize_t len, Field *fields, int *nfields)
{
    int nf = 0;
    const char *p = raw, *end = raw + len;
    p = skip_ws(p, end);
    if (p >= end || *p != '{') return 0;
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}') return 0;
    for (;;) {
        if (p >= end || *p != '"' || nf >= MAX_FIELDS) return 0;
        Field *f = &fields[nf];
        f->key = p + 1;
        const char *q = scan_string(p + 1, end);
        if (!q) return 0;
        f->klen = q - f->key;
        p = skip_ws(q + 1, end);
        if (p >= end || *p != ':') return 0;
        p = skip_ws(p + 1, end);
        if (p >= end) return 0;
        char c = *p;
        if (c == '"') {
            f->val = p + 1;
            q = scan_string(p + 1, end);
            if (!q) return 0;
            f->vlen = q - f->val; f->type = T_STR; p = q + 1;
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            f->val = p;
            q = scan_number(p, end, &f->type);
            if (!q) return 0;
            f->vlen = q - p; p = q;
        } else if (c == 't' && end - p >= 4 && !memcmp(p, "true", 4)) {
            f->val = p; f->vlen = 4; f->type = T_BOOL; p += 4;
        } else if (c == 'f' && end - p >= 5 && !memcmp(p, "false", 5)) {
            f->val = p; f->vlen = 5; f->type = T_BOOL; p += 5;
        } else if (c == 'n' && end - p >= 4 && !memcmp(p, "null", 4)) {
            f->val = p; f->vlen = 4; f->type = T_NULL; p += 4;
        } else {
            return 0;
        }
        f->spec = -1;
        nf++;
        p = skip_ws(p, end);
        if (p >= end) return 0;
        if (*p == ',') { p = skip_ws(p + 1, end); continue; }
        if (*p == '}') break;
        return 0;
    }
    p = skip_ws(p + 1, end);
    if (p != end) return 0;
    *nfields = nf;
    return 1;
}

/* ---------------------------------------------------------------- checks */

static inline int
all_digits(const char *s, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9') return 0;
    return 1;
}

static int
billing_ok(Engine *e, const Spec *s, const Field *f)
{
    if (!(s->types & f->type)) return 0;
    if (f->type == T_NULL) return 1;
    const char *v = f->val; Py_ssize_t n = f->vlen;
    switch (s->check) {
    case C_NONE: return 1;
    case C_CDR_ID: return n >= 1 && n <= 128;
    case C_ACCOUNT: return f->type == T_INT || (n >= 1 && n <= 256);
    case C_NONNEG: return v[0] != '-';
    case C_CURRENCY:
        if (n != 3) return 0;
        for (int i = 0; i < 3; i++) if (v[i] < 'A' || v[i] > 'Z') return 0;
        return 1;
    case C_MCC: return n == 3 && all_digits(v, 3);
    case C_MNC: return (n == 2 || n == 3) && all_digits(v, n);
    case C_COUNTRY: { int i = letters2(v, n); return i >= 0 && e->countries[i]; }
    }
    return 0;
}

/* An identifier's normalised form (what its pseudonym is over) and generalised part.
 * out buffers hold at least 256 + 8 bytes. Returns 0 to decline. */
static int
identifier(Engine *e, const Spec *s, const char *v, Py_ssize_t n, char *norm, Py_ssize_t *nlen,
           char *gen, Py_ssize_t *glen)
{
    *glen = -1;
    switch (s->kind) {
    case K_MSISDN: {
        if (n > 256) return 0;
        char t[256]; Py_ssize_t m = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            char c = v[i];
            if (c == ' ' || c == '-' || c == '.' || c == '(' || c == ')' || c == '/' || c == '\t') continue;
            t[m++] = c;
        }
        const char *d = t; Py_ssize_t dl = m;
        if (m >= 1 && t[0] == '+') { d = t + 1; dl = m - 1; }
        else if (m >= 2 && t[0] == '0' && t[1] == '0') { d = t + 2; dl = m - 2; }
        if (dl < 8 || dl > 15 || !all_digits(d, dl) || d[0] == '0') return 0;
        int w, code = 0, found = 0;
        for (w = 1; w <= 3; w++) {
            code = code * 10 + (d[w - 1] - '0');
            if (e->cc[w][code]) { found = 1; break; }
        }
        if (!found) return 0;
        norm[0] = '+'; memcpy(norm + 1, d, dl); *nlen = dl + 1;
        gen[0] = '+'; memcpy(gen + 1, d, w); *glen = w + 1;
        return 1;
    }
    case K_IMSI: {
        if (n < 14 || n > 15 || !all_digits(v, n)) return 0;
        int mcc = (v[0] - '0') * 100 + (v[1] - '0') * 10 + (v[2] - '0');
        int mncl = e->mnc3[mcc] ? 3 : 2;
        memcpy(norm, v, n); *nlen = n;
        memcpy(gen, v, 3); gen[3] = '-'; memcpy(gen + 4, v + 3, mncl); *glen = 4 + mncl;
        return 1;
    }
    case K_IMEI: {
        if (n < 14 || n > 16 || !all_digits(v, n)) return 0;
        if (n == 15) {
            int total = 0;
            for (Py_ssize_t i = 0; i < 15; i++) {
                int d = v[14 - i] - '0';
                if (i & 1) { d *= 2; if (d > 9) d -= 9; }
                total += d;
            }
            if (total % 10) return 0;
        }
        memcpy(norm, v, n); *nlen = n;
        memcpy(gen, v, 8); *glen = 8;
        return 1;
    }
    case K_EMAIL: {
        /* service.identifiers.make_check_email on printable ASCII */
        if (n > 254) return 0;
        Py_ssize_t at = -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (v[i] == ' ') return 0;
            if (v[i] == '@') at = i;
        }
        if (at <= 0 || at > 64) return 0;
        const char *dom = v + at + 1; Py_ssize_t dl = n - at - 1;
        if (dl < 1 || !memchr(dom, '.', dl) || dom[0] == '.' || dom[dl - 1] == '.') return 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            char c = v[i];
            norm[i] = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
        }
        *nlen = n;
        if (s->keep_domain) { memcpy(gen, norm + at + 1, dl); *glen = dl; }
        return 1;
    }
    default:   /* opaque */
        if (n < 1 || n > 256) return 0;
        memcpy(norm, v, n); *nlen = n;
        return 1;
    }
}

/* ---------------------------------------------------------------- time */

static long long
days_from_civil(long long y, unsigned m, unsigned d)
{
    y -= m <= 2;
    const long long era = (y >= 0 ? y : y - 399) / 400;
    const unsigned yoe = (unsigned)(y - era * 400);
    const unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (long long)doe - 719468;
}

static void
civil_from_days(long long z, int *y, int *m)
{
    z += 719468;
    const long long era = (z >= 0 ? z : z - 146096) / 146097;
    const unsigned doe = (unsigned)(z - era * 146097);
    const unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    const unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    const unsigned mp = (5 * doy + 2) / 153;
    const unsigned mm = mp < 10 ? mp + 3 : mp - 9;
    *y = (int)((long long)yoe + era * 400 + (mm <= 2));
    *m = (int)mm;
}

static inline int
num(const char *s, int n)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v;
}

/* "YYYY-MM" for y in 1970-9999 */
static void
month_digits(char month[8], int y, int m)
{
    month[0] = (char)('0' + y / 1000); month[1] = (char)('0' + y / 100 % 10);
    month[2] = (char)('0' + y / 10 % 10); month[3] = (char)('0' + y % 10);
    month[4] = '-'; month[5] = (char)('0' + m / 10); month[6] = (char)('0' + m % 10);
}

/* epoch ms and "YYYY-MM" of an event time; 0 to decline */
static int
event_time(const Field *f, long long *ms, char month[8])
{
    static const int dim[13] = {0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (f->type == T_INT) {
        if (f->vlen > 15) return 0;
        long long v = 0;
        for (Py_ssize_t i = 0; i < f->vlen; i++) {
            if (f->val[i] == '-') return 0;
            v = v * 10 + (f->val[i] - '0');
        }
        if (v > 253402300799999LL) return 0;
        int y, m;
        civil_from_days(v / 86400000LL, &y, &m);
        month_digits(month, y, m);
        *ms = v;
        return 1;
    }
    /* "YYYY-MM-DDTHH:MM:SS", then ".fff" or nothing, then "Z" or "+HH:MM" / "-HH:MM" */
    if (f->type != T_STR || f->vlen < 20) return 0;
    const char *s = f->val;
    Py_ssize_t n = f->vlen, z = 19;
    if (s[4] != '-' || s[7] != '-' || s[10] != 'T' || s[13] != ':' || s[16] != ':') return 0;
    int y = num(s, 4), mo = num(s + 5, 2), d = num(s + 8, 2), h = num(s + 11, 2),
        mi = num(s + 14, 2), se = num(s + 17, 2), frac = 0;
    if (s[19] == '.') {
        if (n < 24) return 0;
        frac = num(s + 20, 3);
        z = 23;
    }
    long long offset_min = 0;
    if (n == z + 1) {
        if (s[z] != 'Z') return 0;
    } else if (n == z + 6) {
        if ((s[z] != '+' && s[z] != '-') || s[z + 3] != ':') return 0;
        int oh = num(s + z + 1, 2), om = num(s + z + 4, 2);
        if (oh < 0 || oh > 23 || om < 0 || om > 59) return 0;
        offset_min = (s[z] == '-' ? -1 : 1) * (oh * 60LL + om);
    } else {
        return 0;
    }
    if (y < 1 || mo < 1 || mo > 12 || d < 1 || h < 0 || h > 23 || mi < 0 || mi > 59 || se < 0
        || se > 59 || frac < 0)
        return 0;
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (d > dim[mo] + (mo == 2 && leap)) return 0;
    long long v = ((days_from_civil(y, (unsigned)mo, (unsigned)d) * 24 + h) * 60 + mi
                   - offset_min) * 60000LL + se * 1000LL + frac;
    if (offset_min == 0) {
        memcpy(month, s, 7);
    } else {
        /* the month of the instant in UTC, the reference zone */
        if (v < 0 || v > 253402300799999LL) return 0;
        int uy, um;
        civil_from_days(v / 86400000LL, &uy, &um);
        month_digits(month, uy, um);
    }
    *ms = v;
    return 1;
}

/* ---------------------------------------------------------------- month contexts */

static void
ctx_clear(Ctx *c)
{
    Py_CLEAR(c->month_str);
    Py_CLEAR(c->head);
    Py_CLEAR(c->leaves);
    if (c->aead) EVP_CIPHER_CTX_free(c->aead);   /* cleanses the key schedule */
    if (c->mac) EVP_MAC_CTX_free(c->mac);
    c->aead = NULL; c->mac = NULL;
    OPENSSL_cleanse(c->header, sizeof c->header);
    PyMem_Free(c->aad); c->aad = NULL;
}

/* The batch's context for (month, class), from the Python callback:
 * cb(month: str, class_index: int) -> None (decline this month's records) or
 * (head: bytes, billing_until_ms: int, subkey: bytes, header: bytes, aad_prefix: bytes,
 *  pseudonym_key: bytes). Returns NULL with an exception set on failure. */
static Ctx *
get_ctx(Ctx *ctxs, int *nctx, const char month[7], int cls, PyObject *cb)
{
    for (int i = 0; i < *nctx; i++)
        if (ctxs[i].cls == cls && !memcmp(ctxs[i].month, month, 7)) return &ctxs[i];
    if (*nctx >= MAX_CTX) return &ctxs[MAX_CTX];   /* the sentinel: declined */
    Ctx *c = &ctxs[*nctx];
    memset(c, 0, sizeof *c);
    memcpy(c->month, month, 7);
    c->cls = cls;
    c->month_str = PyUnicode_FromStringAndSize(month, 7);
    if (!c->month_str) return NULL;
    (*nctx)++;
    PyObject *r = PyObject_CallFunction(cb, "Oi", c->month_str, cls);
    if (!r) return NULL;
    if (r == Py_None) { Py_DECREF(r); c->declined = 1; return c; }
    PyObject *head; const char *subkey, *header, *aadp, *pkey;
    Py_ssize_t sklen, hlen, alen, pklen;
    if (!PyArg_ParseTuple(r, "SLy#y#y#y#", &head, &c->billing_until_ms, &subkey, &sklen, &header,
                          &hlen, &aadp, &alen, &pkey, &pklen)) {
        Py_DECREF(r); return NULL;
    }
    if (sklen != 32 || hlen > (Py_ssize_t)sizeof c->header) {
        Py_DECREF(r); PyErr_SetString(PyExc_ValueError, "bad month context"); return NULL;
    }
    Py_INCREF(head); c->head = head;
    memcpy(c->header, header, hlen); c->header_len = hlen;
    c->aad_cap = alen + 256;
    c->aad = PyMem_Malloc(c->aad_cap);
    if (!c->aad) { Py_DECREF(r); PyErr_NoMemory(); return NULL; }
    memcpy(c->aad, aadp, alen); c->aad_prefix_len = alen;
    c->aead = EVP_CIPHER_CTX_new();
    c->mac = EVP_MAC_CTX_new(g_hmac);
    OSSL_PARAM params[2] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, "SHA256", 0),
                            OSSL_PARAM_construct_end()};
    int ok = c->aead && c->mac
             && EVP_EncryptInit_ex2(c->aead, g_gcm, (const unsigned char *)subkey, NULL, NULL)
             && EVP_MAC_init(c->mac, (const unsigned char *)pkey, (size_t)pklen, params);
    Py_DECREF(r);
    if (!ok) { PyErr_SetString(PyExc_RuntimeError, "OpenSSL refused the month keys"); return NULL; }
    return c;
}

/* leaves[month] (a bytearray shared by the month's classes: one tree per topic), made on
 * the month's first record, as the Python path does; NULL with an exception set. */
static PyObject *
ctx_leaves(Ctx *c, PyObject *leaves)
{
    if (c->leaves) return c->leaves;
    PyObject *buf = PyDict_GetItemWithError(leaves, c->month_str);
    if (!buf) {
        if (PyErr_Occurred()) return NULL;
        buf = PyByteArray_FromStringAndSize(NULL, 0);
        if (!buf) return NULL;
        if (PyDict_SetItem(leaves, c->month_str, buf) < 0) { Py_DECREF(buf); return NULL; }
    } else if (!PyByteArray_Check(buf)) {
        PyErr_SetString(PyExc_TypeError, "leaves[month] must be a bytearray");
        return NULL;
    } else {
        Py_INCREF(buf);
    }
    c->leaves = buf;
    return buf;
}

/* ---------------------------------------------------------------- output */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static const char HEX[] = "0123456789abcdef";

static char *
b64(char *o, const unsigned char *in, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 2 < n; i += 3) {
        unsigned v = (in[i] << 16) | (in[i + 1] << 8) | in[i + 2];
        *o++ = B64[v >> 18]; *o++ = B64[(v >> 12) & 63]; *o++ = B64[(v >> 6) & 63]; *o++ = B64[v & 63];
    }
    if (n - i == 1) {
        unsigned v = in[i] << 16;
        *o++ = B64[v >> 18]; *o++ = B64[(v >> 12) & 63]; *o++ = '='; *o++ = '=';
    } else if (n - i == 2) {
        unsigned v = (in[i] << 16) | (in[i + 1] << 8);
        *o++ = B64[v >> 18]; *o++ = B64[(v >> 12) & 63]; *o++ = B64[(v >> 6) & 63]; *o++ = '=';
    }
    return o;
}

static inline char *
put(char *o, const void *p, Py_ssize_t n)
{
    memcpy(o, p, n);
    return o + n;
}

static int
reserve(Engine *e, Py_ssize_t need)
{
    if (need <= e->cap) return 0;
    Py_ssize_t cap = need * 2 + 4096;
    char *b = PyMem_Realloc(e->buf, cap);
    if (!b) { PyErr_NoMemory(); return -1; }
    e->buf = b; e->cap = cap;
    return 0;
}

static PyObject *
out_record(PyTypeObject *type, PyObject *idx, PyObject *month, PyObject *key, PyObject *ms,
           const char *doc, Py_ssize_t len, PyObject *digest)
{
    PyObject *value = PyBytes_FromStringAndSize(doc, len);
    if (!value) return NULL;
    PyObject *r = type->tp_alloc(type, 6);
    if (!r) { Py_DECREF(value); return NULL; }
    /* Every item is an int, str, bytes or None: the tuple can be in no reference cycle,
     * so the cyclic GC need not traverse it (CPython untracks such tuples itself, but
     * only when a collection first visits them: two per record made every young
     * collection walk a batch's worth, ~15% of the engine's time). */
    PyObject_GC_UnTrack(r);
    Py_INCREF(idx); Py_INCREF(month); Py_INCREF(key); Py_INCREF(ms); Py_INCREF(digest);
    PyTuple_SET_ITEM(r, 0, idx);
    PyTuple_SET_ITEM(r, 1, month);
    PyTuple_SET_ITEM(r, 2, key);
    PyTuple_SET_ITEM(r, 3, ms);
    PyTuple_SET_ITEM(r, 4, value);
    PyTuple_SET_ITEM(r, 5, digest);
    return r;
}

/* Insertion sort by the fields' ranks (their names' order, computed once): ~15 keys,
 * often nearly in order. glibc's qsort is a merge sort that allocates a buffer per
 * call, and comparing names by memcmp per step was ~5% of the engine's samples. */
static void
sort_fields(const Engine *e, Field **f, int n)
{
    for (int i = 1; i < n; i++) {
        Field *x = f[i];
        int rx = e->rank[x->spec], j = i - 1;
        while (j >= 0 && rx < e->rank[f[j]->spec]) { f[j + 1] = f[j]; j--; }
        f[j + 1] = x;
    }
}

/* One record. Returns 1 when written, 0 when declined, -1 on an exception. */
static int
one(Engine *e, Py_ssize_t index, const char *raw, Py_ssize_t len, long long now_ms,
    long long latest_ms, int integrity, PyObject *cb, Ctx *ctxs, int *nctx, PyObject *sealed,
    PyObject *sanitised, PyTypeObject *otype, const char *tag, Py_ssize_t tag_len,
    PyObject *leaves)
{
    Field fields[MAX_FIELDS];
    int nf = 0;
    int seen[MAX_SPECS];
    memset(seen, -1, sizeof(int) * e->nspecs);
    if (len > e->max_bytes || !scan_object(raw, len, fields, &nf)) return 0;
    for (int k = 0; k < nf; k++) {
        Field *f = &fields[k];
        /* which policy field, and no key twice */
        f->spec = -1;
        for (int i = 0; i < e->nspecs; i++) {
            const Spec *s = &e->specs[i];
            if (s->nlen == f->klen && s->name[0] == f->key[0] && !memcmp(s->name, f->key, f->klen)) {
                f->spec = i;
                break;
            }
        }
        if (f->spec >= 0) {
            if (seen[f->spec] >= 0) return 0;
            seen[f->spec] = k;
        } else {
            for (int j = 0; j < k; j++)
                if (fields[j].spec < 0 && fields[j].klen == f->klen && !memcmp(fields[j].key, f->key, f->klen))
                    return 0;
        }
    }

    /* required fields, types and value checks: any failure is the Python path's to word */
    if (e->idx_cdr_id < 0 || e->idx_account < 0 || e->idx_event_time < 0) return 0;
    int ic = seen[e->idx_cdr_id], ia = seen[e->idx_account], ie = seen[e->idx_event_time];
    if (ic < 0 || ia < 0 || ie < 0) return 0;
    if (fields[ic].type != T_STR || fields[ia].type == T_NULL || fields[ie].type == T_NULL) return 0;
    Field *billing[MAX_FIELDS];
    Field *idents[MAX_FIELDS];
    int nb = 0, ni = 0;
    for (int j = 0; j < nf; j++) {
        Field *f = &fields[j];
        if (f->spec < 0) continue;
        const Spec *s = &e->specs[f->spec];
        if (s->ident) {
            if (f->type == T_NULL) continue;      /* a null identifier is an absent one */
            if (f->type != T_STR) return 0;
            idents[ni++] = f;
        } else {
            if (!billing_ok(e, s, f)) return 0;
            billing[nb++] = f;
        }
    }
    long long event_ms;
    char month[8];
    if (!event_time(&fields[ie], &event_ms, month)) return 0;
    int cls = 0;
    if (e->idx_country >= 0 && seen[e->idx_country] >= 0) {
        Field *cf = &fields[seen[e->idx_country]];
        if (cf->type == T_STR) {
            int ci = letters2(cf->val, cf->vlen);
            if (ci < 0) return 0;
            cls = e->class_of[ci];
        } else if (cf->type != T_NULL) {
            return 0;
        }
    }
    if (event_ms > latest_ms) return 0;   /* before the context, as the Python path */
    Ctx *ctx = get_ctx(ctxs, nctx, month, cls, cb);
    if (!ctx) return -1;
    if (ctx->declined || now_ms >= ctx->billing_until_ms) return 0;

    /* identifiers: checked and normalised before anything is written */
    char norm[MAX_FIELDS][264], gen[MAX_FIELDS][264];
    Py_ssize_t nlen[MAX_FIELDS], glen[MAX_FIELDS];
    unsigned mask = 0;
    for (int j = 0; j < ni; j++) {
        const Spec *s = &e->specs[idents[j]->spec];
        if (!identifier(e, s, idents[j]->val, idents[j]->vlen, norm[j], &nlen[j], gen[j], &glen[j]))
            return 0;
        if (s->gen >= 0) mask |= 1u << s->gen;
    }

    /* the canonical billing document: keys sorted, values as received */
    sort_fields(e, billing, nb);
    /* room for: the canonical document, the sealed view (with the plaintext and the
     * blob staged past its end), the sanitised view; the body is never longer than the
     * record (whitespace and dropped fields go, nothing is added) */
    Py_ssize_t plain_len = 2, idents_len = 0;
    for (int j = 0; j < ni; j++) {
        const Spec *s = &e->specs[idents[j]->spec];
        plain_len += s->jname_len + idents[j]->vlen + 3;
        idents_len += s->gen_len + glen[j] + 2 + s->pkey_len + 2 * PSEUDONYM_BYTES + 1;
    }
    Py_ssize_t head_len = PyBytes_GET_SIZE(ctx->head);
    Py_ssize_t need = 3 * len + 2 * head_len + PyBytes_GET_SIZE(e->absent[mask]) + idents_len
                      + 6 * plain_len + 4 * ctx->header_len + tag_len + 1024;
    if (reserve(e, need) < 0) return -1;
    char *doc = e->buf, *o = doc;
    *o++ = '{';
    for (int j = 0; j < nb; j++) {
        Field *f = billing[j];
        if (j) *o++ = ',';
        *o++ = '"'; o = put(o, f->key, f->klen); *o++ = '"'; *o++ = ':';
        if (f->type == T_STR) { *o++ = '"'; o = put(o, f->val, f->vlen); *o++ = '"'; }
        else o = put(o, f->val, f->vlen);
    }
    *o++ = '}';
    Py_ssize_t doc_len = o - doc, body_len = doc_len - 1;

    unsigned char md[32];
    char hexd[64];
    PyObject *digest = Py_None;
    Py_INCREF(Py_None);
    if (integrity) {
        sha256_parts(doc, doc_len, NULL, 0, NULL, 0, md);
        for (int i = 0; i < 32; i++) { hexd[2 * i] = HEX[md[i] >> 4]; hexd[2 * i + 1] = HEX[md[i] & 15]; }
        Py_DECREF(digest);
        digest = PyUnicode_FromStringAndSize(hexd, 64);
        if (!digest) return -1;
    }

    /* the sealed view: body, head, the blob */
    char *sealed_doc = o;
    o = put(o, doc, body_len);
    o = put(o, PyBytes_AS_STRING(ctx->head), PyBytes_GET_SIZE(ctx->head));
    o = put(o, ",\"sealed\":\"", 11);
    {
        /* plaintext: {"msisdn":"...","imsi":"..."} in input order, as orjson writes it */
        unsigned char *pt = (unsigned char *)(o + 2 * plain_len + 2 * ctx->header_len + 128);
        unsigned char *w = pt;
        *w++ = '{';
        for (int j = 0; j < ni; j++) {
            const Spec *s = &e->specs[idents[j]->spec];
            if (j) *w++ = ',';
            memcpy(w, s->jname, s->jname_len); w += s->jname_len;
            *w++ = '"'; memcpy(w, idents[j]->val, idents[j]->vlen); w += idents[j]->vlen; *w++ = '"';
        }
        *w++ = '}';
        Py_ssize_t ptl = w - pt;
        /* blob = header | nonce | ciphertext | tag */
        unsigned char *blob = w, *bw = blob;
        ctx->counter++;
        memcpy(bw, ctx->header, ctx->header_len); bw += ctx->header_len;
        unsigned char *nonce = bw;
        memset(nonce, 0, 4);
        for (int i = 0; i < 8; i++) nonce[4 + i] = (unsigned char)(ctx->counter >> (56 - 8 * i));
        bw += 12;
        Py_ssize_t cdr_len = fields[ic].vlen;
        if (ctx->aad_prefix_len + cdr_len > ctx->aad_cap) { Py_DECREF(digest); return 0; }
        memcpy(ctx->aad + ctx->aad_prefix_len, fields[ic].val, cdr_len);
        int outl = 0, fl = 0;
        int ok = EVP_EncryptInit_ex2(ctx->aead, NULL, NULL, nonce, NULL)
                 && EVP_EncryptUpdate(ctx->aead, NULL, &outl, (unsigned char *)ctx->aad,
                                      (int)(ctx->aad_prefix_len + cdr_len))
                 && EVP_EncryptUpdate(ctx->aead, bw, &outl, pt, (int)ptl)
                 && EVP_EncryptFinal_ex(ctx->aead, bw + outl, &fl)
                 && EVP_CIPHER_CTX_ctrl(ctx->aead, EVP_CTRL_GCM_GET_TAG, 16, bw + outl + fl);
        if (!ok) { Py_DECREF(digest); PyErr_SetString(PyExc_RuntimeError, "AES-GCM failed"); return -1; }
        bw += outl + fl + 16;
        o = b64(o, blob, bw - blob);
    }
    *o++ = '"'; *o++ = '}';
    Py_ssize_t sealed_len = o - sealed_doc;

    /* the sanitised view: body, head, generalised parts and pseudonyms, absent parts, tail */
    char *san = o;
    o = put(o, doc, body_len);
    o = put(o, PyBytes_AS_STRING(ctx->head), PyBytes_GET_SIZE(ctx->head));
    for (int j = 0; j < ni; j++) {
        const Spec *s = &e->specs[idents[j]->spec];
        if (s->gen >= 0 && glen[j] >= 0) {
            o = put(o, s->gen_key, s->gen_len);
            *o++ = '"'; o = put(o, gen[j], glen[j]); *o++ = '"';
        }
        unsigned char mac[32];
        size_t macl = 0;
        int ok = EVP_MAC_init(ctx->mac, NULL, 0, NULL)
                 && EVP_MAC_update(ctx->mac, (unsigned char *)s->mac_prefix, s->mac_len)
                 && EVP_MAC_update(ctx->mac, (unsigned char *)norm[j], nlen[j])
                 && EVP_MAC_final(ctx->mac, mac, &macl, sizeof mac);
        if (!ok) { Py_DECREF(digest); PyErr_SetString(PyExc_RuntimeError, "HMAC failed"); return -1; }
        o = put(o, s->pkey, s->pkey_len);
        for (int i = 0; i < PSEUDONYM_BYTES; i++) { *o++ = HEX[mac[i] >> 4]; *o++ = HEX[mac[i] & 15]; }
        *o++ = '"';
    }
    o = put(o, PyBytes_AS_STRING(e->absent[mask]), PyBytes_GET_SIZE(e->absent[mask]));
    if (integrity) {
        o = put(o, ",\"billing_digest\":\"", 19);
        o = put(o, hexd, 64);
        *o++ = '"';
    }
    if (tag) {
        /* the record's leaf: "<batch>/<index in the month's tree>" (service/integrity.py);
         * nothing past this point declines the record */
        if (!ctx_leaves(ctx, leaves)) { Py_DECREF(digest); return -1; }
        o = put(o, ",\"integrity_leaf\":\"", 19);
        o = put(o, tag, tag_len);
        *o++ = '/';
        char digits[24];
        int nd = 0;
        for (Py_ssize_t v = PyByteArray_GET_SIZE(ctx->leaves) / 32; nd == 0 || v; v /= 10)
            digits[nd++] = (char)('0' + v % 10);
        while (nd) *o++ = digits[--nd];
        *o++ = '"';
    }
    *o++ = '}';
    Py_ssize_t san_len = o - san;

    /* the records */
    Field *af = &fields[ia];
    PyObject *key = PyBytes_FromStringAndSize(af->val, af->vlen);
    PyObject *ms = PyLong_FromLongLong(event_ms);
    PyObject *idx = PyLong_FromSsize_t(index);
    PyObject *r1 = NULL, *r2 = NULL;
    int rc = -1;
    if (key && ms && idx) {
        r1 = out_record(otype, idx, ctx->month_str, key, ms, sealed_doc, sealed_len, Py_None);
        r2 = r1 ? out_record(otype, idx, ctx->month_str, key, ms, san, san_len, digest) : NULL;
        if (r2 && PyList_Append(sealed, r1) == 0 && PyList_Append(sanitised, r2) == 0) rc = 1;
    }
    if (rc == 1 && tag) {
        /* its RFC 6962 leaf hash, SHA-256(0x00 || digest), at that index */
        static const unsigned char zero = 0;
        Py_ssize_t at = PyByteArray_GET_SIZE(ctx->leaves);
        if (PyByteArray_Resize(ctx->leaves, at + 32) < 0) rc = -1;
        else sha256_parts(&zero, 1, md, 32, NULL, 0, (unsigned char *)PyByteArray_AS_STRING(ctx->leaves) + at);
    }
    Py_XDECREF(key); Py_XDECREF(ms); Py_XDECREF(idx); Py_XDECREF(r1); Py_XDECREF(r2);
    Py_DECREF(digest);
    return rc;
}

/* Engine.run(values, now_ms, latest_ms, integrity, ctx_cb, sealed, sanitised, OutRecord
 *            [, leaf_tag, leaves]) -> list of the indices declined (for the Python path).
 * leaf_tag (bytes, printable ASCII without '"' or '\\', at most 64; integrity on): each
 * sanitised record gets ',"integrity_leaf":"<leaf_tag>/<i>"' after its digest, i its
 * index in leaves[month] (a bytearray of 32-byte leaf hashes, created here if missing),
 * to which its leaf hash is appended. None (the default): neither. */
static PyObject *
engine_run(Engine *self, PyObject *args)
{
    PyObject *values, *cb, *sealed, *sanitised, *tag_obj = Py_None, *leaves = Py_None;
    PyTypeObject *otype;
    long long now_ms, latest_ms;
    int integrity;
    if (!PyArg_ParseTuple(args, "OLLpOO!O!O!|OO", &values, &now_ms, &latest_ms, &integrity, &cb,
                          &PyList_Type, &sealed, &PyList_Type, &sanitised, &PyType_Type, &otype,
                          &tag_obj, &leaves))
        return NULL;
    if (!PyType_IsSubtype(otype, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "OutRecord must be a tuple type"); return NULL;
    }
    const char *tag = NULL;
    Py_ssize_t tag_len = 0;
    if (tag_obj != Py_None) {
        int ok = PyBytes_Check(tag_obj) && PyDict_Check(leaves) && integrity
                 && PyBytes_GET_SIZE(tag_obj) > 0 && PyBytes_GET_SIZE(tag_obj) <= 64;
        for (Py_ssize_t i = 0; ok && i < PyBytes_GET_SIZE(tag_obj); i++)
            ok = PLAIN[(unsigned char)PyBytes_AS_STRING(tag_obj)[i]];
        if (!ok) {
            PyErr_SetString(PyExc_ValueError,
                            "leaf_tag: 1-64 bytes of printable ASCII without '\"' or '\\', with a "
                            "leaves dict and integrity on");
            return NULL;
        }
        tag = PyBytes_AS_STRING(tag_obj);
        tag_len = PyBytes_GET_SIZE(tag_obj);
    } else {
        leaves = Py_None;
    }
    /* A tuple of the values, not the caller's list: the month callback runs Python code,
     * which must not be able to resize the sequence (or free a record) under the loop. */
    PyObject *seq = PySequence_Tuple(values);
    if (!seq) return NULL;
    PyObject *declined = PyList_New(0);
    Ctx *ctxs = PyMem_Calloc(MAX_CTX + 1, sizeof(Ctx));
    if (!declined || !ctxs) { Py_XDECREF(declined); Py_DECREF(seq); PyMem_Free(ctxs); return PyErr_NoMemory(); }
    ctxs[MAX_CTX].declined = 1;
    int nctx = 0;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    int failed = 0;
    for (Py_ssize_t i = 0; i < n && !failed; i++) {
        PyObject *v = items[i];
        int r = 0;
        if (PyBytes_Check(v))
            r = one(self, i, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v), now_ms, latest_ms,
                    integrity, cb, ctxs, &nctx, sealed, sanitised, otype, tag, tag_len, leaves);
        if (r < 0) { failed = 1; break; }
        if (r == 0) {
            PyObject *idx = PyLong_FromSsize_t(i);
            if (!idx || PyList_Append(declined, idx) < 0) failed = 1;
            Py_XDECREF(idx);
        }
    }
    for (int i = 0; i < nctx; i++) ctx_clear(&ctxs[i]);
    PyMem_Free(ctxs);
    Py_DECREF(seq);
    if (failed) { Py_DECREF(declined); return NULL; }
    return declined;
}

/* ---------------------------------------------------------------- verification */

#define MAX_ADDED 64

static inline int
name_before(const Field *x, const Field *y)
{
    /* byte order = code point order for ASCII keys: orjson's OPT_SORT_KEYS */
    Py_ssize_t n = x->klen < y->klen ? x->klen : y->klen;
    int c = memcmp(x->key, y->key, n);
    return c < 0 || (c == 0 && x->klen < y->klen);
}

/* One sanitised record for service/verify.py: its billing digest (the canonical document
 * of every field not in `added`), whether the stated billing_digest matches it, and its
 * cdr_id. Returns 0 to decline (the Python path decides), 1 when done. */
static int
verify_one(const char *raw, Py_ssize_t len, const char **added, const Py_ssize_t *alen, int nadded,
           const char *dname, Py_ssize_t dlen, char **buf, Py_ssize_t *cap,
           unsigned char digest[32], int *ok, const char **cdr_id, Py_ssize_t *cdr_len)
{
    Field fields[MAX_FIELDS];
    Field *billing[MAX_FIELDS];
    int nf = 0, nb = 0;
    if (!scan_object(raw, len, fields, &nf)) return 0;
    const Field *stated = NULL;
    *cdr_id = NULL;
    for (int k = 0; k < nf; k++) {
        Field *f = &fields[k];
        /* a key twice reads two ways: the Python path words that finding */
        for (int j = 0; j < k; j++)
            if (fields[j].klen == f->klen && fields[j].key[0] == f->key[0]
                && !memcmp(fields[j].key, f->key, f->klen))
                return 0;
        if (f->klen == dlen && !memcmp(f->key, dname, dlen)) stated = f;
        int drop = 0;
        for (int a = 0; a < nadded && !drop; a++)
            drop = alen[a] == f->klen && added[a][0] == f->key[0] && !memcmp(added[a], f->key, f->klen);
        if (drop) continue;
        if (f->klen == 6 && !memcmp(f->key, "cdr_id", 6) && f->type == T_STR) {
            *cdr_id = f->val;   /* into the record, not into `fields` (gone on return) */
            *cdr_len = f->vlen;
        }
        /* insertion sort as it comes: ~15 keys */
        int j = nb - 1;
        while (j >= 0 && name_before(f, billing[j])) { billing[j + 1] = billing[j]; j--; }
        billing[j + 1] = f;
        nb++;
    }
    if (len + 2 > *cap) {
        Py_ssize_t c = len * 2 + 4096;
        char *b = PyMem_Realloc(*buf, c);
        if (!b) { PyErr_NoMemory(); return -1; }
        *buf = b; *cap = c;
    }
    char *o = *buf;
    *o++ = '{';
    for (int j = 0; j < nb; j++) {
        Field *f = billing[j];
        if (j) *o++ = ',';
        *o++ = '"'; o = put(o, f->key, f->klen); *o++ = '"'; *o++ = ':';
        if (f->type == T_STR) { *o++ = '"'; o = put(o, f->val, f->vlen); *o++ = '"'; }
        else o = put(o, f->val, f->vlen);
    }
    *o++ = '}';
    sha256_parts(*buf, o - *buf, NULL, 0, NULL, 0, digest);
    *ok = 0;
    if (stated && stated->type == T_STR && stated->vlen == 64) {
        *ok = 1;
        for (int i = 0; i < 32 && *ok; i++)
            *ok = stated->val[2 * i] == HEX[digest[i] >> 4] && stated->val[2 * i + 1] == HEX[digest[i] & 15];
    }
    return 1;
}

/* digests(values, added, digest_field) -> (digests, leaves, status, ids)
 *   values: bytes or buffers (sanitised records); added: the names the service adds
 *   (bytes), dropped before hashing; digest_field: b"billing_digest".
 *   digests[i]: SHA-256 of the canonical billing document; leaves[i]: its RFC 6962 leaf
 *   hash SHA-256(0x00 || digest); status[i]: 1 matches its stated digest, 0 does not,
 *   255 declined (digests, leaves and ids hold None there: the Python path's to fill);
 *   ids[i]: the cdr_id if a string, else None. */
static PyObject *
native_digests(PyObject *mod, PyObject *args)
{
    PyObject *values, *added_t;
    const char *dname;
    Py_ssize_t dlen;
    if (!PyArg_ParseTuple(args, "OO!y#", &values, &PyTuple_Type, &added_t, &dname, &dlen)) return NULL;
    int nadded = (int)PyTuple_GET_SIZE(added_t);
    if (nadded > MAX_ADDED) { PyErr_SetString(PyExc_ValueError, "too many added fields"); return NULL; }
    const char *added[MAX_ADDED];
    Py_ssize_t alen[MAX_ADDED];
    for (int a = 0; a < nadded; a++) {
        PyObject *b = PyTuple_GET_ITEM(added_t, a);
        if (!PyBytes_Check(b) || PyBytes_GET_SIZE(b) == 0) {
            PyErr_SetString(PyExc_TypeError, "added: non-empty bytes"); return NULL;
        }
        added[a] = PyBytes_AS_STRING(b); alen[a] = PyBytes_GET_SIZE(b);
    }
    PyObject *seq = PySequence_Fast(values, "values must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *digests = PyList_New(n), *leaves = PyList_New(n), *ids = PyList_New(n);
    PyObject *status = PyBytes_FromStringAndSize(NULL, n);
    char *buf = NULL;
    Py_ssize_t cap = 0;
    int failed = !digests || !leaves || !ids || !status;
    if (failed && !PyErr_Occurred()) PyErr_NoMemory();
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n && !failed; i++) {
        PyObject *v = items[i];
        Py_buffer view;
        const char *raw;
        Py_ssize_t len;
        int has_view = 0;
        if (PyBytes_Check(v)) {
            raw = PyBytes_AS_STRING(v); len = PyBytes_GET_SIZE(v);
        } else if (PyObject_GetBuffer(v, &view, PyBUF_SIMPLE) == 0) {
            raw = view.buf; len = view.len; has_view = 1;
        } else {
            failed = 1; break;
        }
        unsigned char digest[32], leaf[32];
        int ok = 0;
        const char *cid = NULL;
        Py_ssize_t cid_len = 0;
        int r = verify_one(raw, len, added, alen, nadded, dname, dlen, &buf, &cap, digest, &ok,
                           &cid, &cid_len);
        PyObject *d = NULL, *l = NULL, *id = NULL;
        if (r == 1) {
            static const unsigned char zero = 0;
            sha256_parts(&zero, 1, digest, 32, NULL, 0, leaf);
        }
        if (r == 1) {
            d = PyBytes_FromStringAndSize((char *)digest, 32);
            l = PyBytes_FromStringAndSize((char *)leaf, 32);
            if (cid) id = PyUnicode_FromStringAndSize(cid, cid_len);
            else { id = Py_None; Py_INCREF(id); }
            if (!d || !l || !id) r = -1;
            PyBytes_AS_STRING(status)[i] = (char)ok;
        } else if (r == 0) {
            d = Py_None; l = Py_None; id = Py_None;
            Py_INCREF(d); Py_INCREF(l); Py_INCREF(id);
            PyBytes_AS_STRING(status)[i] = (char)255;
        }
        if (has_view) PyBuffer_Release(&view);
        if (r < 0) { Py_XDECREF(d); Py_XDECREF(l); Py_XDECREF(id); failed = 1; break; }
        PyList_SET_ITEM(digests, i, d);
        PyList_SET_ITEM(leaves, i, l);
        PyList_SET_ITEM(ids, i, id);
    }
    PyMem_Free(buf);
    Py_DECREF(seq);
    if (failed) {
        Py_XDECREF(digests); Py_XDECREF(leaves); Py_XDECREF(ids); Py_XDECREF(status);
        return NULL;
    }
    return Py_BuildValue("(NNNN)", digests, leaves, status, ids);
}

/* ---------------------------------------------------------------- Merkle roots */

/* The RFC 6962 tree head over n leaf hashes (32 bytes each, in `h`, overwritten):
 * adjacent nodes paired level by level, SHA-256(0x01 || left || right), an odd last node
 * promoted unchanged: service/merkle.py's root_from_leaf_hashes, which it must equal. */
static void
root_in_place(unsigned char *h, Py_ssize_t n, unsigned char out[32])
{
    static const unsigned char node = 1;
    while (n > 1) {
        Py_ssize_t m = 0;
        for (Py_ssize_t i = 0; i + 1 < n; i += 2, m++) {
            unsigned char out[32];
            sha256_parts(&node, 1, h + 32 * i, 64, NULL, 0, out);
            memcpy(h + 32 * m, out, 32);
        }
        if (n % 2) { memmove(h + 32 * m, h + 32 * (n - 1), 32); m++; }
        n = m;
    }
    memcpy(out, h, 32);
}

/* merkle_root(hashes) -> bytes: the tree head over leaf hashes (bytes of 32 each; n >= 1),
 * or over one bytes-like object holding them end to end (the transform's leaves[month]).
 * merkle_root_of_hex(digests) -> bytes: the same over the leaf hashes of the digests
 * given in hex (SHA-256(0x00 || bytes.fromhex(d)) each; "" is an empty leaf). */
static PyObject *
merkle(PyObject *seq_in, int hex)
{
    if (!hex && PyObject_CheckBuffer(seq_in)) {
        Py_buffer view;
        if (PyObject_GetBuffer(seq_in, &view, PyBUF_SIMPLE) < 0) return NULL;
        PyObject *res = NULL;
        if (view.len < 32 || view.len % 32) {
            PyErr_SetString(PyExc_ValueError, "leaf hashes: a non-empty multiple of 32 bytes");
        } else {
            unsigned char *h = PyMem_Malloc((size_t)view.len), out[32];
            if (!h) {
                PyErr_NoMemory();
            } else {
                memcpy(h, view.buf, (size_t)view.len);
                root_in_place(h, view.len / 32, out);
                res = PyBytes_FromStringAndSize((char *)out, 32);
                PyMem_Free(h);
            }
        }
        PyBuffer_Release(&view);
        return res;
    }
    PyObject *seq = PySequence_Fast(seq_in, "expected a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1) { Py_DECREF(seq); PyErr_SetString(PyExc_ValueError, "no leaves"); return NULL; }
    unsigned char *h = PyMem_Malloc(32 * (size_t)n);
    unsigned char buf[1 + 128];
    PyObject *res = NULL;
    if (!h) { PyErr_NoMemory(); goto done; }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = items[i];
        if (!hex) {
            if (!PyBytes_Check(v) || PyBytes_GET_SIZE(v) != 32) {
                PyErr_SetString(PyExc_ValueError, "a leaf hash is 32 bytes");
                goto done;
            }
            memcpy(h + 32 * i, PyBytes_AS_STRING(v), 32);
            continue;
        }
        Py_ssize_t len;
        const char *s = PyUnicode_Check(v) ? PyUnicode_AsUTF8AndSize(v, &len) : NULL;
        if (!s || len % 2 || len > 256) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "a digest is hex text of at most 128 bytes");
            goto done;
        }
        buf[0] = 0;
        for (Py_ssize_t j = 0; j < len; j++) {
            char c = s[j];
            int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
                    : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
            if (d < 0) { PyErr_SetString(PyExc_ValueError, "a digest is hex text"); goto done; }
            if (j % 2) buf[1 + j / 2] |= (unsigned char)d;
            else buf[1 + j / 2] = (unsigned char)(d << 4);
        }
        sha256_parts(buf, 1 + len / 2, NULL, 0, NULL, 0, h + 32 * i);
    }
    unsigned char out[32];
    root_in_place(h, n, out);
    res = PyBytes_FromStringAndSize((char *)out, 32);
done:
    PyMem_Free(h);
    Py_DECREF(seq);
    return res;
}

static PyObject *
native_merkle_root(PyObject *mod, PyObject *arg)
{
    return merkle(arg, 0);
}

static PyObject *
native_merkle_root_of_hex(PyObject *mod, PyObject *arg)
{
    return merkle(arg, 1);
}

static PyMethodDef engine_methods[] = {
    {"run", (PyCFunction)engine_run, METH_VARARGS,
     "run(values, now_ms, latest_ms, integrity, ctx_cb, sealed, sanitised, OutRecord"
     "[, leaf_tag, leaves]) -> declined"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "service._native.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The transform's per-record path for the common records (see the module).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)engine_init,
    .tp_dealloc = (destructor)engine_dealloc,
    .tp_methods = engine_methods,
};

static PyMethodDef module_methods[] = {
    {"digests", native_digests, METH_VARARGS,
     "digests(values, added, digest_field) -> (digests, leaves, status, ids); see the source"},
    {"merkle_root", native_merkle_root, METH_O, "merkle_root(leaf_hashes) -> the RFC 6962 tree head"},
    {"merkle_root_of_hex", native_merkle_root_of_hex, METH_O,
     "merkle_root_of_hex(hex_digests) -> the tree head over their leaf hashes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "service._native",
    "The transform's per-record path in C (service/_native.c).", -1, module_methods, NULL, NULL,
    NULL, NULL,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    for (int c = 0x20; c < 0x7f; c++) PLAIN[c] = 1;
    PLAIN['"'] = 0;
    PLAIN['\\'] = 0;
    g_gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    g_hmac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    if (!g_gcm || !g_hmac) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL lacks AES-256-GCM or HMAC");
        return NULL;
    }
    if (PyType_Ready(&EngineType) < 0) return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m) return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType); Py_DECREF(m); return NULL;
    }
    if (PyModule_AddStringConstant(m, "OPENSSL_VERSION", OpenSSL_version(OPENSSL_VERSION)) < 0) {
        Py_DECREF(m); return NULL;
    }
    return m;
}
