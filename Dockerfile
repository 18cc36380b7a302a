# pirl_jax on an NVIDIA GPU: docker build -t pirl_jax . && docker run --gpus all pirl_jax \
#   --config=configs/pirl.py:isic --config.data.path=/data/isic2017 --workdir=/runs/pirl-isic
# (mount /data and /runs with -v). JAX brings its CUDA 12 libraries as pip wheels; the base image
# supplies the CUDA runtime environment that the NVIDIA container toolkit expects.
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/pirl_jax
# Dependencies first, so that a code change does not reinstall them.
COPY requirements.txt pyproject.toml README.md ./
RUN pip install -r requirements.txt "jax[cuda12]>=0.10.2"
COPY configs ./configs
COPY pirl_jax ./pirl_jax
COPY benchmarks ./benchmarks
COPY main.py ./
RUN pip install --no-deps -e .

ENTRYPOINT ["python", "main.py"]
CMD ["--config=configs/pirl.py"]
