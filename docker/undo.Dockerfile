# undo itself, for docker/compose.yml (built from the repository's root: context ..).
FROM python:3.12-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md LICENSE /src/
COPY undo /src/undo
COPY migrations /src/migrations
RUN pip install --no-cache-dir /src && rm -rf /src
ENTRYPOINT ["undo"]
