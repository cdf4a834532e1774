#!/bin/bash
# SFT with a pixel stem (GK_STEM=channels,kernel), 1 thread, then eval 512.
cd /work/runs/s6
name=$1; stem=$2; shift 2
GK_STEM=$stem RAYON_NUM_THREADS=1 /work/runs/r1_sgg_stem sft --out $name "$@" > $name.log 2>&1
RAYON_NUM_THREADS=1 /work/runs/r1_sgg_stem eval --init $name/sft.safetensors --out $name --eval-size 512 > $name.eval.log 2>&1
echo exit $? >> $name.eval.log
