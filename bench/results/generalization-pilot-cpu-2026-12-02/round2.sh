#!/usr/bin/env bash
# Pilot round 2 for issue #16 (after /work/pilot-runs): label smoothing 0.1, rho 0.1, flip-only
# augmentation, and a second seed of the base regime. One run at a time.
cd /work/main
BASE="--data-dir /work/shared/data/cifar10 --model small_cnn_w48 --train-subset 2500 --epochs 80 --lr-schedule step_wrn --lr 0.1 --weight-decay 5e-4 --batch-size 128 --eval-every 80 --sharpness-every 80 --sharpness-k 2 --sharpness-samples 1024 --sharpness-iters 20 --backend native --quiet"
run() { name=$1; shift; /usr/bin/time -f "$name wall %e s cpu %U+%S s" .venv/bin/python -m samfast.cifar.train $BASE --out /work/pilot2/$name "$@" > /work/pilot2/$name.log 2>&1; tail -1 /work/pilot2/$name.log >> /work/pilot2/times.txt; }
run ls_sgd   --augment none --label-smoothing 0.1 --optimizer sgd --seed 0
run ls_sam05 --augment none --label-smoothing 0.1 --optimizer sam --rho 0.05 --seed 0
run sam10    --augment none --optimizer sam --rho 0.1 --seed 0
run s1_sgd   --augment none --optimizer sgd --seed 1
run s1_sam05 --augment none --optimizer sam --rho 0.05 --seed 1
run flip_sgd   --augment flip --optimizer sgd --seed 0
run flip_sam05 --augment flip --optimizer sam --rho 0.05 --seed 0
echo done >> /work/pilot2/times.txt
