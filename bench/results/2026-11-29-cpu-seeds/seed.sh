#!/bin/bash
# One full seed: SFT (2400 steps) -> eval 2048 -> GRPO (defaults) -> eval 2048, 1 thread.
# ./seed.sh NAME SEED [extra sft flags, e.g. --pixel-stem 16]
cd /work/runs/s7
name=$1; seed=$2; shift 2
B=/work/runs/s7/r1_sgg
export RAYON_NUM_THREADS=1
/usr/bin/time -v $B sft --seed $seed --out $name-sft "$@" > $name-sft.log 2> $name-sft.time
$B eval --seed $seed --init $name-sft/sft.safetensors --out $name-sft-2048 --eval-size 2048 > $name-sft-2048.eval.log 2>&1
/usr/bin/time -v $B grpo --seed $seed --init $name-sft/sft.safetensors --out $name-grpo --eval-every 0 > $name-grpo.log 2> $name-grpo.time
$B eval --seed $seed --init $name-grpo/grpo.safetensors --out $name-grpo-2048 --eval-size 2048 > $name-grpo-2048.eval.log 2>&1
echo done >> $name.done
