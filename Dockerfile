# The beaver REST server in a container.
#
#   docker build -t beaver .
#   docker run -p 8000:8000 -v "$(pwd)/my-beaver-data:/app/data" \
#       -e BEAVER_TOKEN=s3cret -e DATABASE=data/production.db beaver
#
# The server listens on 0.0.0.0 inside the container, so it requires a bearer token
# (BEAVER_TOKEN); set BEAVER_INSECURE=1 instead to run without one on a trusted network.
FROM python:3.12-slim

WORKDIR /src
COPY pyproject.toml README.md beaver.py beaver_vector.py beaver_server.py ./
RUN pip install --no-cache-dir ".[server,vector]" && rm -rf /src

WORKDIR /app
VOLUME /app/data
ENV DATABASE=data/beaver.db \
    BEAVER_HOST=0.0.0.0 \
    BEAVER_PORT=8000 \
    PYTHONUNBUFFERED=1
EXPOSE 8000

CMD ["python", "-m", "beaver_server"]
