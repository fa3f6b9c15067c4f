# cdranon: the stream processor, the retention controller and the CLI, in one image.
#   docker build -t cdranon .
#   docker run --rm cdranon --help
# Multi-stage: wheels are built (with a compiler and libcrypto's headers: cdranon's own
# wheel carries the native transform path, service/_native.c) in the first stage; the runtime stage installs them without network or compiler and
# runs as an unprivileged user.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first (their layer survives source edits), pinned by constraints.txt.
COPY pyproject.toml setup.py constraints.txt README.md ./
COPY service ./service
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt .

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CDRANON_HOME=/var/lib/cdranon \
    CDRANON_KEYSTORE=file:///var/lib/cdranon/keys \
    CDRANON_METRICS__HOST=0.0.0.0
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links /wheels cdranon \
    && python -c "import service._native" \
    && groupadd --system --gid 10001 cdranon \
    && useradd --system --uid 10001 --gid cdranon --home-dir /var/lib/cdranon --shell /usr/sbin/nologin cdranon \
    && install -d -o cdranon -g cdranon -m 0700 /var/lib/cdranon /var/lib/cdranon/keys /var/lib/cdranon/secrets
# A fresh named volume mounted on these directories takes their owner and mode.
VOLUME ["/var/lib/cdranon/keys"]
USER 10001:10001
WORKDIR /var/lib/cdranon
EXPOSE 9464
ENTRYPOINT ["cdranon"]
CMD ["run"]
