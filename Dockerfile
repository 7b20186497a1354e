# The beaver REST server in a container.
#
#   docker build -t beaver .
#   docker run -p 8000:8000 -v "$(pwd)/my-beaver-data:/app/data" \
#       -e BEAVER_TOKEN=s3cret -e DATABASE=data/production.db beaver
#
# The server listens on 0.0.0.0 inside the container, so it requires a bearer token
# (BEAVER_TOKEN); set BEAVER_INSECURE=1 instead to run without one on a trusted network.
# It runs as the unprivileged user "beaver" (uid 10001): a mounted data folder must be
# writable by that uid. BASE swaps the base image (any Debian-like image with python, pip
# and useradd on PATH); scripts/check-image.sh builds and checks the image that way.
ARG BASE=python:3.12-slim
FROM ${BASE}

WORKDIR /src
COPY pyproject.toml README.md LICENSE beaver.py beaver_vector.py beaver_server.py beaver_postgres.py ./
COPY beaver_dashboard ./beaver_dashboard
RUN pip install --no-cache-dir ".[server,vector]" && rm -rf /src

RUN useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin beaver \
    && mkdir -p /app/data && chown -R beaver:beaver /app
WORKDIR /app
USER beaver
VOLUME /app/data
ENV DATABASE=data/beaver.db \
    BEAVER_HOST=0.0.0.0 \
    BEAVER_PORT=8000 \
    PYTHONUNBUFFERED=1
EXPOSE 8000

# Python's standard library only (no curl in the image): the server answers "/" with the
# container's own token.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:%s/' % os.environ.get('BEAVER_PORT', '8000'), headers={'Authorization': 'Bearer ' + os.environ.get('BEAVER_TOKEN', '')}), timeout=4)"]

CMD ["python", "-m", "beaver_server"]
