#!/usr/bin/env bash
# Start this host's Ray node with the pipeline's scheduling contract (pipeline/runtime.py):
#   inference_core = one per physical core: each inference actor holds one and is pinned to it;
#   CPU            = every logical CPU: read and preprocessing tasks, which the OS puts on the
#                    hyperthread siblings and on whatever the actors leave idle.
# Extra arguments go to `ray start` (--head, --address=..., ports). Override the counts with
# INFERENCE_CORES=N / PREPROCESS_CPUS=N; DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

physical_cores=$(lscpu -p=CORE,SOCKET | grep -v '^#' | sort -u | wc -l)
inference_cores=${INFERENCE_CORES:-$physical_cores}
# nproc answers OMP_NUM_THREADS when it is set; the node's CPUs are wanted here
preprocess_cpus=${PREPROCESS_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}

command=(ray start "$@" --num-cpus="$preprocess_cpus" --resources="{\"inference_core\": $inference_cores}")
if [[ -n "${DRY_RUN:-}" ]]; then
    echo "${command[@]}"
else
    exec "${command[@]}"
fi
