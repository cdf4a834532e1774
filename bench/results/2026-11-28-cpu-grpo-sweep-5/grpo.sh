#!/bin/bash
# GRPO (current defaults) from s6/<sft>/sft.safetensors, 1 thread, then eval 512.
cd /work/runs/s6
sft=$1; name=$2; shift 2
RAYON_NUM_THREADS=1 /work/runs/r1_sgg_stem grpo --init $sft/sft.safetensors --out $name --eval-every 0 "$@" > $name.log 2>&1
RAYON_NUM_THREADS=1 /work/runs/r1_sgg_stem eval --init $name/grpo.safetensors --out $name --eval-size ${EVAL:-512} > $name.eval.log 2>&1
echo exit $? >> $name.eval.log
