#!/bin/bash
cd /work/runs/s6
for n in "$@"; do
 ck=$(ls $n/*.safetensors | head -1)
 RAYON_NUM_THREADS=1 /work/runs/r1_sgg_stem eval --init $ck --out $n-2048 --eval-size 2048 > $n-2048.eval.log 2>&1
done
