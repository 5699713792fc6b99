# ringserve, CPU image: docker build -t ringserve:0.1.0-cpu .
# Entry points are the console scripts (ringserve-master, -worker, -ps, -publish, -admin, -keys,
# -local); the Kubernetes manifests (deploy/) choose one per container with `command`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1

# The pinned torch, CPU build (no CUDA libraries: a much smaller image).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /src/ringserve
COPY . .
RUN pip install . && rm -rf /src/ringserve

# The manifests run as this user (runAsUser 10001) with state under /var/lib/ringserve.
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin ringserve \
    && mkdir -p /var/lib/ringserve /etc/ringserve && chown -R ringserve /var/lib/ringserve
USER 10001
WORKDIR /home/ringserve

CMD ["ringserve-master", "--help"]
