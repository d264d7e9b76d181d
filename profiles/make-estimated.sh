#!/bin/sh
# The estimated profiles: models larger than one device, built on the meta device and priced at an
# H100's datasheet peaks (no weights allocated; each takes under a minute on a laptop CPU).
set -eu
cd "$(dirname "$0")/.."
# GPT-3 175B (Brown et al. 2020, table 2.1: 96 layers, d_model 12288, 96 heads, context 2048); the
# GPT-2 tokenizer's 50257 entries padded to 50304, as Megatron-LM pads them (a multiple of its
# --make-vocab-size-divisible-by 128), so that tensor parallelism can split the embedding's rows
planner profile models/gpt.py:build --arg n_layer=96 --arg d_model=12288 --arg n_head=96 --arg vocab=50304 \
    --arg seq=2048 --estimate h100 --dtype bfloat16 --mbs 1,2 -o profiles/gpt3-175b.h100-estimate.json
# Llama-2-70B (Touvron et al. 2023: 80 layers, d_model 8192, 64 heads, 8 key-value heads, FFN 28672,
# vocab 32000; context 4096), through Hugging Face transformers
planner profile models/hf.py:build --arg model_type=llama --arg n_layer=80 --arg d_model=8192 --arg n_head=64 \
    --arg num_key_value_heads=8 --arg intermediate_size=28672 --arg vocab=32000 --arg seq=4096 \
    --estimate h100 --dtype bfloat16 --mbs 1,2 -o profiles/llama2-70b.h100-estimate.json
