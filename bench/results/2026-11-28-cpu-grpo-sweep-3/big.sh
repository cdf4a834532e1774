#!/bin/bash
# Evaluations on 2048 images per split (4x the demo's), one thread each.
B=/work/runs/r1_sgg_v4
cd /work/runs/s4
case $1 in
  sft)  RAYON_NUM_THREADS=1 $B eval --init /work/runs/demo4/sft.safetensors --out big_sft --eval-size 2048 > big_sft.eval.log 2>&1
        RAYON_NUM_THREADS=1 $B grpo --init /work/runs/demo4/sft.safetensors --out w125soft --reward-weights 1,2,5 --edge-reward soft --eval-every 0 > w125soft.log 2>&1
        RAYON_NUM_THREADS=1 $B eval --init w125soft/grpo.safetensors --out w125soft --eval-size 2048 > w125soft.eval.log 2>&1 ;;
  grpo) RAYON_NUM_THREADS=1 $B eval --init /work/runs/demo4/grpo.safetensors --out big_grpo --eval-size 2048 > big_grpo.eval.log 2>&1 ;;
esac
# R1-SGG's own settings: weights 1,2,5, hard recall, box tokens in the loss.
if [ "$1" = r1sgg ]; then
  RAYON_NUM_THREADS=1 $B grpo --init /work/runs/demo4/sft.safetensors --out r1sgg --reward-weights 1,2,5 --train-box-tokens --eval-every 0 > r1sgg.log 2>&1
  RAYON_NUM_THREADS=1 $B eval --init r1sgg/grpo.safetensors --out r1sgg --eval-size 2048 > r1sgg.eval.log 2>&1
fi
