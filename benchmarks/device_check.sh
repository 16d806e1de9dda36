#!/usr/bin/env bash
# One prepared run for a lent GPU machine (torch and triton preinstalled, no network), sized for a
# short lease: build the CUDA extension, run the kernel tests (the GPU tier included), then the
# benchmark harness, kernel ops first and the end-to-end suites last. Every stage has its own time
# limit, so a slow stage costs only itself; the harness rewrites its JSON after every case, so a
# stopped run keeps what it measured.
#
#   benchmarks/device_check.sh            # all stages
#   STAGES="build bench_kernels" benchmarks/device_check.sh
#   STAGES=bench_rewards BENCH_ARGS=--quick OUT=/tmp/dry benchmarks/device_check.sh   # a dry run on the CPU
#   KERNEL_OPS=temporal_block,spatial_cross_attention benchmarks/device_check.sh
#   STAGES="build profile" PROFILE_OPS=distillation_step benchmarks/device_check.sh   # where the time goes
#   STAGES=profile PROFILE_OPS=reward_mixture PROFILE_IMPLS=sequential,batched PROFILE_S=rest benchmarks/device_check.sh
#   STAGES=bench_models MODEL_OPS=generate MODEL_COMPILE_S=400 benchmarks/device_check.sh   # the compiled variants
#   KERNEL_ARGS="--batch-sizes 1 --profile 20" benchmarks/device_check.sh   # harness arguments of one stage
#
# $OUT (default: benchmarks/results) gets device.log (this script's own output), build.log, tests.log,
# bench.log and one harness JSON file a bench or profile stage: eight files at most, the lent machine's
# limit.
# Packages the machine lacks travel as wheels in .whl/ (git-ignored; carry it). For its Python 3.12:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
# The release's reference data travels the same way, so the golden tests run there too (41 MB):
#   mkdir -p .shared && cp -r ../shared/vc2_reference ../shared/reward_reference .shared/
#   grep -qx .shared .git/info/exclude || echo .shared >> .git/info/exclude    # then carry .shared
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
STAGES="${STAGES:-build tests bench_kernels bench_rewards bench_models}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device.log") 2>&1

# The extension takes about a minute to compile on the lent machine (one nvcc process does most of
# it), so the tests that cannot reach it run beside the build; those of ops with a CUDA backend wait.
TRITON_ONLY_TESTS=(
    tests/test_spatial_attention.py tests/test_motion_energy.py tests/test_temporal_block.py
    tests/test_geglu.py tests/test_layer_norm.py tests/test_group_norm.py
)
CUDA_BACKEND_TESTS=(
    tests/test_temporal_attention.py tests/test_temporal_attention_cuda.py tests/test_solver_kernels.py
    tests/test_reward_preprocess.py tests/test_dispatch.py tests/test_patching.py
    tests/test_compile_and_registration.py tests/test_cuda_graphs.py tests/test_reward_mixture.py tests/test_bench.py
    tests/test_vc2_unet.py tests/test_pipeline.py tests/test_demo.py::test_short_demo_run_on_the_gpu
)
# Files whose GPU tier alone runs here (their CPU tests are CI's): a training step and the
# motion prior waiting on the GPU only to read their results, training on the UNet's kernels.
GPU_TIER_ONLY_TESTS=(tests/test_train.py tests/test_motion_prior.py)
# Each stage's ops (override to time only what a previous lease left unmeasured). A stage's time
# limit can be overridden too, as <STAGE>_S in capitals (BENCH_KERNELS_S=300; rest: up to the deadline;
# TESTS_S sets every test stage).
ALL_KERNEL_OPS=guided_solver_step,consistency_output,consistency_sampler_step,pseudo_huber_loss
ALL_KERNEL_OPS+=,temporal_attention,temporal_block,geglu,layer_norm,group_norm_silu,strided_linear,spatial_self_attention,spatial_cross_attention,reward_preprocess
KERNEL_OPS=${KERNEL_OPS:-$ALL_KERNEL_OPS}
REWARD_OPS=${REWARD_OPS:-bf16_matmul,reward_mixture,reward_mixture_growth}
MODEL_OPS=${MODEL_OPS:-unet_forward,generate,vae_decode,distillation_step,motion_prior,whole_recipe}
# Seconds the end-to-end stage may spend compiling (the reference-compile and kernels-compile
# variants of issues 4 and 6; a full UNet compiles in minutes): 0 skips them.
MODEL_COMPILE_S=${MODEL_COMPILE_S:-0}
# The profile stage (only when STAGES names it): the costliest kernels of one call of each
# end-to-end op at batch 1, reference eager against kernels, and where the host's time to issue
# one call goes (cProfile's functions of most own time).
PROFILE_OPS=${PROFILE_OPS:-unet_forward,distillation_step}
PROFILE_IMPLS=${PROFILE_IMPLS:-reference-eager,kernels}
# BENCH_ARGS go to every harness stage; KERNEL_ARGS, REWARD_ARGS, MODEL_ARGS to one (after BENCH_ARGS).
read -r -a BENCH <<< "python3 -m benchmarks --out $OUT --no-plot ${BENCH_ARGS:-}"
read -r -a KERNEL_ARGS <<< "${KERNEL_ARGS:-}"
read -r -a REWARD_ARGS <<< "${REWARD_ARGS:-}"
read -r -a MODEL_ARGS <<< "${MODEL_ARGS:-}"

say() { echo "== $* ($(date -u +%T))"; }

# stage NAME SECONDS LOG COMMAND...: runs COMMAND when NAME is in $STAGES, its output appended to $OUT/LOG,
# killed after SECONDS (or $<NAME>_S when set) or at the run's deadline (BUDGET_S after the start),
# whichever comes first; rest runs to the deadline.
DEADLINE=$(( SECONDS + ${BUDGET_S:-560} ))
stage() {
    local name=$1 log=$OUT/$3 limit_var="${1^^}_S"
    local seconds=${!limit_var:-$2}
    shift 3
    [[ " $STAGES " == *" $name "* ]] || return 0
    if ! [[ $seconds =~ ^([0-9]+|rest)$ ]]; then say "$name: skipped, $limit_var=$seconds is neither seconds nor rest"; return 0; fi
    local left=$(( DEADLINE - SECONDS ))
    if [[ $seconds == rest ]] || (( seconds > left )); then seconds=$left; fi
    if (( seconds < 10 )); then say "$name: skipped, the run's time is spent"; return 0; fi
    say "$name: at most ${seconds}s"
    # SIGINT first: pytest, interrupted, still prints the tracebacks of the failures so far (the
    # first H200 lease lost those of a test stage stopped by SIGTERM); the harness has written its
    # JSON after every implementation either way.
    timeout --signal=INT --kill-after=20 "$seconds" "$@" >> "$log" 2>&1
    say "$name: exit $? (log: $log)"
}

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { say "wheel install failed"; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ -d .shared ]]; then export T2V_TURBO_SHARED="$PWD/.shared"; fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

# GNU nproc reports OMP_NUM_THREADS where it is set: the cores are counted without it.
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
stage build 240 build.log env TURBO_KERNELS_BUILD_CUDA=1 MAX_JOBS="$CORES" python3 setup.py build_ext --inplace &
building=$!
# Each test prints its own line as it ends (-v), so a log cut short by the limit still says which passed.
PYTEST=(python3 -m pytest -v -rfEs -p no:cacheprovider --timeout 120 --durations 10)
# Each worker's share of the cores as its thread count: the CPU tests among these (the float64
# UNet's) ran 12 workers of 16 threads each on a lent H200's 16 cores, and four ran past pytest's
# 120 s limit that way.
TRITON_WORKERS=$(( CORES > 5 ? CORES - 4 : 1 )) CUDA_WORKERS=$(( CORES > 1 ? CORES * 3 / 4 : 1 ))
threads_each() { local threads=$(( CORES / $1 )); echo $(( threads > 0 ? threads : 1 )); }
stage tests 180 tests.log env OMP_NUM_THREADS="$(threads_each $TRITON_WORKERS)" "${PYTEST[@]}" -n $TRITON_WORKERS \
    "${TRITON_ONLY_TESTS[@]}"
wait "$building"
tail -3 "$OUT/build.log"
python3 -c "import turbo_kernels as tk; print('backends on cuda:', tk.backends('cuda'))"
stage tests 300 tests.log env OMP_NUM_THREADS="$(threads_each $CUDA_WORKERS)" "${PYTEST[@]}" -n $CUDA_WORKERS \
    "${CUDA_BACKEND_TESTS[@]}"
stage tests 90 tests.log "${PYTEST[@]}" -m gpu "${GPU_TIER_ONLY_TESTS[@]}"
grep -E "^=+ .*(passed|failed|error)" "$OUT/tests.log"

stage profile 120 bench.log "${BENCH[@]}" --warmup 1 --iters 2 --compile-budget 0 --batch-sizes 1 \
    --impls "$PROFILE_IMPLS" --profile 30 --profile-host 40 --ops "$PROFILE_OPS"
stage bench_kernels 140 bench.log "${BENCH[@]}" --compile-budget 90 --ops "$KERNEL_OPS" "${KERNEL_ARGS[@]}"
stage bench_rewards 60 bench.log "${BENCH[@]}" --warmup 2 --iters 5 --compile-budget 0 --ops "$REWARD_OPS" "${REWARD_ARGS[@]}"
stage bench_models rest bench.log "${BENCH[@]}" --warmup 1 --iters 3 --compile-budget "$MODEL_COMPILE_S" --ops "$MODEL_OPS" "${MODEL_ARGS[@]}"
grep -E "^(PASS|FAIL|FITS|OVER|n/a|info) " "$OUT/bench.log"
say "done"
