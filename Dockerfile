# tierq: one image for every role (api, worker, beat, flower, migrate, simulate).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed numeric id, so runAsNonRoot-style checks can verify it.
RUN groupadd --system --gid 10001 tierq \
 && useradd --system --uid 10001 --gid tierq --create-home --home-dir /home/tierq tierq

WORKDIR /src
COPY . .
RUN pip install . \
 && rm -rf /src

# TIERQ_HOME defaults to ./var: keep it in the user's (writable) home.
WORKDIR /home/tierq
USER 10001:10001

EXPOSE 8000 5555
ENTRYPOINT ["tierq"]
CMD ["--help"]
