#!/bin/bash
# GRPO from demo4's SFT checkpoint (1b5e80c, seed 0): the demo's defaults plus a KL penalty.
B=${B:-/work/runs/r1_sgg_diag}
I=/work/runs/demo4/sft.safetensors
cd /work/runs/s5
name=$1; shift
RAYON_NUM_THREADS=1 $B grpo --init $I --out $name --eval-every 0 "$@" > $name.log 2>&1
RAYON_NUM_THREADS=1 $B eval --init $name/grpo.safetensors --out $name --eval-size 512 > $name.eval.log 2>&1
echo exit $? >> $name.eval.log
