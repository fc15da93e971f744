# linformer-train on CUDA GPUs, ready for `deepspeed launch/pretrain.py`.
#   docker build -t linformer-train .
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/runs linformer-train \
#       deepspeed --num_gpus 8 launch/pretrain.py --config configs/base-512.yaml
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-devel

ENV PYTHONUNBUFFERED=1 \
    DS_BUILD_OPS=0 \
    TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0"

RUN apt-get update && apt-get install -y --no-install-recommends git ninja-build && \
    rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
COPY pyproject.toml README.md ./
COPY linformer_train ./linformer_train
# the image's torch 2.7.1 satisfies the project's range, so pip keeps it (no CPU wheel is pulled)
RUN pip install --no-cache-dir -e ".[hf]"
COPY launch ./launch
COPY configs ./configs
COPY tools ./tools

CMD ["deepspeed", "--num_gpus", "1", "launch/pretrain.py", "--config", "configs/tiny.yaml"]
