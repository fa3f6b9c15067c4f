"""``make demo``: a local broker, a realistic CDR stream, the processor, and what came out.

1. Starts a single-node Kafka (``service.devkafka.LocalKafka``, state in ``demo-out/``), or
   uses the broker at ``$CDRANON_BOOTSTRAP`` (then with a fresh topic prefix).
2. A generator thread streams 20k CDRs over four months (one of them older than the
   12-month identifier window, so its identifiers are stripped) with late and malformed
   records into ``cdr.raw``.
3. The processor (the same Runner as ``cdranon run``) anonymises them, exactly once, and
   serves Prometheus metrics while it runs.
4. A read_committed consumer reads the month topics back and prints a few records and the
   counts per outcome. The broker is stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

# NewTopic lives in cimpl; confluent_kafka.admin re-exports it without declaring it.
from confluent_kafka.cimpl import NewTopic

from service.commands.run import build_runner, start_metrics
from service.config import load_settings
from service.devkafka import LocalKafka
from service.errors import CdranonError
from service.generator import generate_cdrs
from service.kafka.topics import TopicNames
from service.keystore import generate_master_key
from service.logs import setup_logging
from service.metrics import Metrics
from service.months import add_months, month_of, now_utc

COUNT = 20_000
RATE = 10_000  # records/s the generator streams at
OUT = Path("demo-out")


def _say(text: str = "") -> None:
    print(text, flush=True)


def _months() -> list[str]:
    y, m = (int(p) for p in month_of(now_utc()).split("-"))
    out = []
    for back in (14, 2, 1, 0):
        y2, m2 = add_months(y, m, -back)
        out.append(f"{y2:04d}-{m2:02d}")
    return out


def _stream(bootstrap: str, topic: str, months: list[str], done: threading.Event) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10})
    start = time.monotonic()
    try:
        for i, value in enumerate(
            generate_cdrs(
                COUNT,
                months=months,
                seed=2025,
                malformed_ratio=0.02,
                late_ratio=0.05,
                now=now_utc(),
            )
        ):
            while True:
                try:
                    producer.produce(topic, value)
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
            ahead = i / RATE - (time.monotonic() - start)
            if ahead > 0.01:
                time.sleep(ahead)  # pacing: a stream, not a bulk load
        producer.flush(60)
    finally:
        done.set()


def _read_back(bootstrap: str, names: TopicNames, expected: int) -> dict[str, list[Any]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"demo-reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    p = names.prefix.replace(".", r"\.")
    # librdkafka's regex is POSIX: [0-9], not \d.
    consumer.subscribe([rf"^{p}\.(sealed|sanitised)\.[0-9]{{4}}-[0-9]{{2}}$", names.rejected])
    got: dict[str, list[Any]] = {"sealed": [], "sanitised": [], "rejected": []}
    deadline = time.monotonic() + 60
    try:

        def complete() -> bool:
            san = got["sanitised"]
            stripped = sum(1 for d in san if not d.get("key_id"))
            return len(san) + len(got["rejected"]) >= expected and len(
                got["sealed"]
            ) + stripped >= len(san)

        while not complete() and time.monotonic() < deadline:
            for msg in consumer.consume(5000, 0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                        continue
                    raise KafkaException(err)
                topic = msg.topic() or ""
                if topic == names.rejected:
                    got["rejected"].append(dict(msg.headers() or []))
                elif ".sealed." in topic:
                    got["sealed"].append(orjson.loads(msg.value() or b"{}"))
                else:
                    got["sanitised"].append(orjson.loads(msg.value() or b"{}"))
    finally:
        consumer.close()
    return got


def _show(doc: dict[str, Any]) -> str:
    shown = {
        k: (v[:24] + "...") if k == "sealed" and isinstance(v, str) else v for k, v in doc.items()
    }
    return orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode()


def main() -> int:
    """Run the demo; 0 on success."""
    OUT.mkdir(exist_ok=True)
    external = os.environ.get("CDRANON_BOOTSTRAP", "").strip()
    broker: LocalKafka | None = None
    if external:
        bootstrap = external
        prefix = f"cdrdemo{uuid.uuid4().hex[:6]}"
        _say(f"Using the broker at {bootstrap} (topic prefix {prefix}).")
    else:
        _say("Starting a local Kafka broker (first run: fetching jars, ~1 min)...")
        broker = LocalKafka(OUT / "kafka", watch_pid=os.getpid())
        bootstrap = broker.start()
        prefix = "cdr"
        _say(f"Kafka is up at {bootstrap}.")
    try:
        return _run(bootstrap, prefix)
    finally:
        if broker is not None:
            _say("Stopping the broker.")
            broker.stop()


def _run(bootstrap: str, prefix: str) -> int:
    names = TopicNames(prefix)
    keys = OUT / "keys"
    shutil.rmtree(keys, ignore_errors=True)
    # The demo's own master key, in memory only: its month keys die with it.
    os.environ.setdefault("CDRANON_MASTER_KEY", generate_master_key())
    os.environ.update(
        {
            "CDRANON_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "CDRANON_KAFKA__TOPIC_PREFIX": prefix,
            "CDRANON_KAFKA__GROUP_ID": f"{prefix}-anonymiser",
            "CDRANON_KEYSTORE": f"file://{keys.absolute()}",
            "CDRANON_TOPICS__REPLICATION_FACTOR": "1",
            # The demo prints its own story; errors still show.
            "CDRANON_LOGGING__LEVEL": "ERROR",
        }
    )
    settings = load_settings()
    setup_logging(settings.logging.level)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(names.raw, 3, 1)]).values():
        try:
            fut.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise

    metrics = Metrics()
    try:
        server = start_metrics(settings, metrics)
    except CdranonError:
        # Port 9464 taken (another cdranon?): any free port will do for the demo.
        server = start_metrics(
            settings.model_copy(
                update={"metrics": settings.metrics.model_copy(update={"port": 0})}
            ),
            metrics,
        )
    url = f"http://{settings.metrics.host}:{server.port}/metrics" if server else "(disabled)"
    months = _months()
    _say(f"Metrics while it runs: {url}")
    _say(f"Streaming {COUNT} CDRs over {', '.join(months)} into {names.raw} ...")
    done = threading.Event()
    gen = threading.Thread(target=_stream, args=(bootstrap, names.raw, months, done), daemon=True)
    gen.start()
    runner = build_runner(settings, metrics)
    t0 = time.monotonic()
    try:
        stats = runner.run(until=lambda s: s.consumed >= COUNT)
    finally:
        if server is not None:
            server.close()
    took = time.monotonic() - t0
    gen.join(30)
    _say(
        f"Processed {stats.consumed} records in {stats.batches} transactions "
        f"({took:.1f}s including start-up, {stats.aborted} aborted)."
    )

    ok = _report(_read_back(bootstrap, names, stats.consumed), stats.consumed)
    _say(f"\nMetrics were served at {url}; `cdranon run` serves them the same way.")
    return 0 if ok else 1


def _report(got: dict[str, list[Any]], consumed: int) -> bool:
    """Print samples and counts; True if every input is accounted for."""
    san = got["sanitised"]
    with_keys = [d for d in san if d.get("key_id")]
    without = [d for d in san if not d.get("key_id")]
    _say("\nA few sanitised records (billing fields in the clear, pseudonyms, no identifiers):")
    for doc in with_keys[:2] + without[:1]:
        _say(_show(doc))
    if got["sealed"]:
        _say("\nA sealed record (identifiers encrypted under the month key):")
        _say(_show(got["sealed"][0]))
    reasons = Counter(
        h["reason"].decode() if isinstance(h.get("reason"), bytes) else "?" for h in got["rejected"]
    )
    by_month = Counter(d.get("month") for d in san)
    _say("\nRead back with isolation.level=read_committed:")
    _say(f"  input records         {consumed}")
    _say(f"  sealed                {len(got['sealed'])}")
    _say(f"  sanitised             {len(san)}  (identifiers stripped: {len(without)})")
    _say(f"  rejected              {len(got['rejected'])}  {dict(reasons)}")
    _say(f"  sanitised per month   {dict(sorted(by_month.items()))}")
    ok = len(san) + len(got["rejected"]) == consumed and len(got["sealed"]) + len(without) == len(
        san
    )
    _say(
        "  every input accounted for: sanitised + rejected = input, sealed + stripped = sanitised"
        if ok
        else "  MISMATCH: some records were not read back (see above)"
    )
    return ok


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CdranonError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        sys.exit(2)
