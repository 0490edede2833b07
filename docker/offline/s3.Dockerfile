# An S3-compatible store for hosts without registry access: moto's server mode (the same
# server the test suite uses), standing in for MinIO in docker/compose.offline.yml.
# In-memory: blobs last as long as the container. Not for production data.
ARG PYTHON_IMAGE=lorapool-local/python:3.11-bookworm
FROM ${PYTHON_IMAGE}
ARG MOTO_VERSION=5.2.5
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/moto/bin:$PATH
RUN python3 -m venv /opt/moto && pip install "moto[server]==${MOTO_VERSION}" \
    && useradd --system --uid 10002 --user-group moto
USER moto
EXPOSE 9000
CMD ["moto_server", "-H", "0.0.0.0", "-p", "9000"]
