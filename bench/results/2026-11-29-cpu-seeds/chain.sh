#!/bin/bash
# Wait for NAME.done, then run seed.sh with the rest.
cd /work/runs/s7
w=$1; shift
while [ ! -f $w.done ]; do sleep 20; done
./seed.sh "$@"
