#!/bin/sh
# How the committed plans were made: rerun after a change to the cost model, the schedules or the
# solver that `planner check plans/*.json` reports. Searches that stop at --time-limit can depend
# on the machine's speed; the others are exact and reproduce the same plan anywhere.
set -eu
cd "$(dirname "$0")/.."
planner solve profiles/gpt.cpu.json --cluster cpu2 --pp 2 --schedule 1f1b,gpipe --global-batch 16 -o plans/gpt.cpu2-pp2.json
planner solve profiles/gpt.h200.json --cluster h200x8 --global-batch 256 -o plans/gpt.h200x8.json
planner solve profiles/gpt.h200.json --cluster 2xh200x8 --global-batch 512 -o plans/gpt.2xh200x8.json
planner solve profiles/gpt-tied-50k.h200.json --cluster h200x8 --pp 4 --global-batch 256 -o plans/gpt-tied-50k.h200x8-pp4.json
for model in cnn encdec unet; do
    planner solve profiles/$model.h200.json --cluster h200x8 --global-batch 256 -o plans/$model.h200x8.json
done
# Models larger than any device, with estimated costs (planner profile --estimate h100; the commands
# are in profiles/make-estimated.sh). Their searches can stop at the time limit; they say how far from proven they are.
planner solve profiles/gpt3-175b.h100-estimate.json --cluster 16xh100x8 --precision mixed --global-batch 1536 --time-limit 60 -o plans/gpt3-175b.16xh100x8.json
planner solve profiles/llama2-70b.h100-estimate.json --cluster 8xh100x8 --precision mixed --global-batch 256 --time-limit 60 -o plans/llama2-70b.8xh100x8.json
