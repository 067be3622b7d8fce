#!/usr/bin/env bash
# The one prepared run on a lent GPU (../shared/GPU.md): build samfast for the card, install it
# NON-editably into a scratch target dir, and run every Python entry point from a scratch
# working directory with PYTHONPATH=<that dir> (so the tree's sources are never imported by
# accident: the log proves where samfast and samfast._C came from). Then the CUDA tests, the
# doctor, the benchmarks and the single-GPU NCCL sanity run; everything under $OUT.
#
# There: an H100/H200, 16 cores, python3 with torch + Triton + ninja + pytest + numpy, nvcc,
# no network, a copy of the working tree (tracked + untracked-not-ignored files: no .venv, no
# build, no .git) plus the carried paths. The whole script ends within 8 minutes: every
# section has its own timeout (budgets in main(): 420 s together, ~15 s before them for the
# machine's versions and the wheels), none runs past a deadline 440 s after the start, and
# the report and the archive take at most 25 s more.
#
#   here, once per run:  bash bench/gpu_check.sh --prepare
#       (wheels for what the machine lacks into .whl/, ignored through .git/info/exclude:
#        pytorch-optimizer for the optimizer-step baseline; and .whl/STAMP with the commit,
#        the clean-tree flag and the source fingerprint: there is no .git there)
#   device:  run(command="bash bench/gpu_check.sh", timeout_s=500, carry=[".whl"])
#       Works without .whl too (no pytorch-optimizer row, commit "unknown").
#   dry run on a CPU machine (tests/test_gpu_check.py runs it from a copy of the tree):
#       DRY_RUN=1 OUT=/tmp/gpu-dry [PYTHON=.venv/bin/python] bash bench/gpu_check.sh
#       same flow; CPU-only build (SAMFAST_NO_CUDA=1), CPU device, tiny sizes, gloo for NCCL.
#
# $OUT (at most 8 files come back from the device, 2 folders deep, a few MiB here):
#   raw.log          everything printed
#   summary.md       sections (status, seconds, budget), test counts, headline numbers
#   summary.json     the same, machine-readable
#   results.tar.gz   the results files in bench/results' format (<stem>-<device>-<date>.md and
#                    .json with device, versions, commit, clean-tree flag): build, tests,
#                    doctor, optimizer_step (fp32, bf16), train_step-bf16, grad_path, pgd,
#                    sharpness-resnet20 (HVP), ddp_sanity; tests-junit.xml, sections.tsv and
#                    logs/ (one log per section and per build step)
#
# Environment: OUT, DRY_RUN=1, PYTHON (default python3; in a dry run ./.venv/bin/python if
# there), GPU_CHECK_TESTS (test files, default the three below), GPU_CHECK_BUILD_FROM=pip|
# build_ext|jit|load (start the build chain later: to try the fallbacks), KEEP_WORK=1 (keep the
# scratch dir), GPU_CHECK_DEADLINE_S (default 440).
set -uo pipefail
TREE=$(cd "$(dirname "$0")/.." && pwd -P)
DRY_RUN=${DRY_RUN:-0}
PY=${PYTHON:-python3}
if [[ -z ${PYTHON:-} && $DRY_RUN == 1 && -x $TREE/.venv/bin/python ]]; then
    PY=$TREE/.venv/bin/python
fi

# The sources that decide the results and travel with the tree (bench/results excluded: it
# changes when this run's results are committed).
fingerprint() {
    (cd "$TREE" && find samfast csrc bench tests setup.py pyproject.toml -type f \
        ! -name '*.so' ! -name '*.pyc' ! -path '*/__pycache__/*' ! -path 'bench/results/*' \
        -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
}

in_git_checkout() {
    [[ "$(git -C "$TREE" rev-parse --show-toplevel 2>/dev/null)" == "$TREE" ]]
}

prepare() {
    cd "$TREE" || exit 1
    in_git_checkout || { echo "--prepare runs in the git checkout"; exit 2; }
    local exclude
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p .whl "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
    local pip_py=python3
    [[ -x .venv/bin/python ]] && pip_py=.venv/bin/python
    # pure Python (py3-none-any): one wheel fits the machine's Python 3.12
    if ! ls .whl/pytorch_optimizer-*.whl >/dev/null 2>&1; then
        "$pip_py" -m pip download -q --no-deps --only-binary=:all: -d .whl \
            pytorch-optimizer==4.1.0 || echo "pytorch-optimizer not downloaded: no row for it"
    fi
    local commit clean=1
    commit=$(git rev-parse --short HEAD)
    [[ -n "$(git status --porcelain)" ]] && { clean=0; commit+=-dirty; }
    printf 'commit=%s\nclean_tree=%s\nfingerprint=%s\n' "$commit" "$clean" "$(fingerprint)" \
        >.whl/STAMP
    echo "wrote .whl/STAMP:"; cat .whl/STAMP; ls -la .whl
    echo 'now: run(command="bash bench/gpu_check.sh", timeout_s=500, carry=[".whl"])'
    exit 0
}

case "${1:-}" in
    --prepare) prepare ;;
    --fingerprint) fingerprint; exit 0 ;;
    "") ;;
    *) echo "usage: bash bench/gpu_check.sh [--prepare | --fingerprint]"; exit 2 ;;
esac

TOP=${OUT:-/tmp/samfast-gpu-check}
mkdir -p "$TOP"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/samfast-gpu-check.XXXXXX")
SITE=$WORK/site        # samfast, installed non-editably
WHEELS=$WORK/wheels    # carried wheels (.whl/*.whl), installed likewise
RUN_DIR=$WORK/run      # every Python entry point runs here, outside the tree
RES=$WORK/results      # what results.tar.gz holds
LOGS=$RES/logs
mkdir -p "$SITE" "$RUN_DIR" "$LOGS"
# A dry run shares a slow CPU: its budgets (and deadline) are SCALE times the GPU's.
SCALE=${GPU_CHECK_BUDGET_SCALE:-$( ((DRY_RUN)) && echo 3 || echo 1)}
START=$SECONDS
DEADLINE=$((START + ${GPU_CHECK_DEADLINE_S:-440} * SCALE))
FAILED=0

say() { printf '[%4ds] %s\n' "$((SECONDS - START))" "$*"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RES/sections.tsv"; }
left() { echo $((DEADLINE - SECONDS)); }

# run_section NAME BUDGET_S CMD...: CMD in $RUN_DIR under min(budget, time to the deadline),
# its output on the console and in logs/NAME.log, its status in sections.tsv.
run_section() {
    local name=$1 budget=$(($2 * SCALE)) t rc took status=ok start=$SECONDS
    shift 2
    t=$(left)
    ((budget < t)) && t=$budget
    if ((t < 5)); then
        say "== $name: SKIPPED ($(left)s left before the deadline)"
        record "$name" "skipped: no time left" 0 "$budget"
        FAILED=1
        return 1
    fi
    say "== $name (budget ${t}s): $*"
    (cd "$RUN_DIR" && timeout -k 10 "$t" "$@") 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    took=$((SECONDS - start))
    if ((rc == 124 || rc == 137)); then
        echo  # the killed command may have left its last line open
        status="TIMEOUT after ${t}s"
    elif ((rc != 0)); then
        status="FAILED (exit $rc)"
    fi
    [[ $status == ok ]] || FAILED=1
    say "== $name: $status, ${took}s of ${t}s"
    record "$name" "$status" "$took" "$t"
    return "$rc"
}

copy_sources() {  # the package sources only, without build products of the tree
    mkdir -p "$1"
    tar -C "$TREE" -c --exclude='*.so' --exclude=__pycache__ --exclude='*.egg-info' \
        setup.py pyproject.toml README.md samfast csrc | tar -C "$1" -x
}

# Non-editable install into $SITE, falling back step by step; each step's log in logs/.
#   1. pip install --no-build-isolation --no-deps --no-index --target $SITE (builds samfast._C)
#   2. the package copied into $SITE, samfast._C built by `setup.py build_ext` in a scratch
#      copy and copied next to it
#   3. SAMFAST_JIT=1: the ops built by torch.utils.cpp_extension.load at first use (csrc copied
#      to $SITE/csrc, where samfast/backends/native.py looks for it), warmed up here once.
#   4. samfast._C built by torch.utils.cpp_extension.load (no setuptools, no pyproject
#      metadata: e.g. a setuptools too old for PEP 639's license string) and copied into
#      $SITE/samfast
BUILD_ROUTE=none
build() {
    local budget=$(($1 * SCALE)) t rc first
    local end=$((SECONDS + budget)) start=$SECONDS
    case ${GPU_CHECK_BUILD_FROM:-pip} in
        pip) first=1 ;; build_ext) first=2 ;; jit) first=3 ;; load) first=4 ;;
        *) say "GPU_CHECK_BUILD_FROM must be pip, build_ext, jit or load"; first=1 ;;
    esac
    step_time() { t=$((end - SECONDS)); local l; l=$(left); ((l < t)) && t=$l; ((t >= 10)); }
    copy_sources "$WORK/src"
    if ((first <= 1)); then
        if step_time; then
            say "build 1/4: pip install --target (timeout ${t}s; logs/build-1-pip.log)"
            (cd "$WORK/src" && timeout -k 10 "$t" "$PY" -m pip install --no-build-isolation \
                --no-deps --no-index --no-cache-dir --target "$SITE" .) \
                >"$LOGS/build-1-pip.log" 2>&1
            rc=$?
            if ((rc == 0)) && compgen -G "$SITE/samfast/_C*.so" >/dev/null; then
                BUILD_ROUTE=pip
            else
                ((rc == 0)) && say "build 1/4: pip installed samfast but built no samfast._C" \
                    || say "build 1/4: pip install failed (exit $rc); its last lines:"
                tail -25 "$LOGS/build-1-pip.log" | sed 's/^/    | /'
            fi
        else
            say "build 1/4: no time left"
        fi
    fi
    if [[ $BUILD_ROUTE == none && ! -f $SITE/samfast/__init__.py ]]; then
        rm -rf "$SITE"/samfast*  # what a failed pip left
        cp -r "$WORK/src/samfast" "$SITE/"
    fi
    if [[ $BUILD_ROUTE == none ]] && ((first <= 2)); then
        if step_time; then
            say "build 2/4: setup.py build_ext in a scratch copy (timeout ${t}s;" \
                "logs/build-2-build_ext.log)"
            copy_sources "$WORK/src2"
            (cd "$WORK/src2" && timeout -k 10 "$t" "$PY" setup.py build_ext --inplace) \
                >"$LOGS/build-2-build_ext.log" 2>&1
            rc=$?
            if ((rc == 0)) && compgen -G "$WORK/src2/samfast/_C*.so" >/dev/null; then
                cp "$WORK"/src2/samfast/_C*.so "$SITE/samfast/"
                BUILD_ROUTE=build_ext
            else
                say "build 2/4: setup.py build_ext failed (exit $rc); its last lines:"
                tail -25 "$LOGS/build-2-build_ext.log" | sed 's/^/    | /'
            fi
        else
            say "build 2/4: no time left"
        fi
    fi
    if [[ $BUILD_ROUTE == none ]] && ((first <= 3)); then
        cp -r "$WORK/src/csrc" "$SITE/csrc"
        export SAMFAST_JIT=1 TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
        if step_time; then
            say "build 3/4: SAMFAST_JIT=1, built once now (timeout ${t}s; logs/build-3-jit.log)"
            (cd "$RUN_DIR" && timeout -k 10 "$t" "$PY" -c "
from samfast.backends import native
error = native.load_error()
print(error or 'JIT build: ok')
raise SystemExit(error is not None)") >"$LOGS/build-3-jit.log" 2>&1
            rc=$?
            if ((rc == 0)); then
                BUILD_ROUTE=jit
            else
                say "build 3/4: the JIT build failed (exit $rc); its last lines:"
                tail -25 "$LOGS/build-3-jit.log" | sed 's/^/    | /'
                unset SAMFAST_JIT
            fi
        else
            say "build 3/4: no time left"
        fi
    fi
    if [[ $BUILD_ROUTE == none ]]; then
        if step_time; then
            say "build 4/4: torch.utils.cpp_extension.load as samfast._C (timeout ${t}s;" \
                "logs/build-4-load.log)"
            (cd "$RUN_DIR" && timeout -k 10 "$t" "$PY" "$TREE/bench/gpu_check_report.py" \
                load-build --src "$WORK/src" --site "$SITE" --build-dir "$WORK/load_build") \
                >"$LOGS/build-4-load.log" 2>&1
            rc=$?
            if ((rc == 0)); then
                BUILD_ROUTE=load
            else
                say "build 4/4: failed (exit $rc); its last lines:"
                tail -25 "$LOGS/build-4-load.log" | sed 's/^/    | /'
            fi
        else
            say "build 4/4: no time left"
        fi
    fi
    local status=ok
    if [[ $BUILD_ROUTE == none ]]; then
        status="FAILED: no native extension (reference and Triton backends only)"
        FAILED=1
    fi
    say "== build: $status; route $BUILD_ROUTE, $((SECONDS - start))s of ${budget}s"
    record build "$status (route $BUILD_ROUTE)" "$((SECONDS - start))" "$budget"
}

main() {
    say "== samfast gpu_check $( ((DRY_RUN)) && echo '(DRY RUN: CPU, tiny sizes) ')$(date -u +%FT%TZ)"
    say "tree $TREE; scratch $WORK; out $TOP; python $PY"
    local device=cuda
    if ((DRY_RUN)); then
        device=cpu
        export SAMFAST_NO_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
        # one thread: on a CPU shared with other work, two OpenMP threads on two cores made a
        # tiny step take 50 ms or 1100 ms at random (a barrier waiting for a preempted thread)
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    else
        export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
    fi
    export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg
    # setup.py points CUDA_HOME at the real toolkit; the JIT and load steps need it too
    [[ -z ${CUDA_HOME:-} && -d /usr/local/cuda ]] && export CUDA_HOME=/usr/local/cuda
    # as on the device: no Triton interpreter outside the tests (tests/conftest.py sets it
    # there when there is no GPU), no JIT unless the build falls back to it
    unset TRITON_INTERPRET SAMFAST_JIT
    export TRITON_CACHE_DIR=$WORK/triton_cache

    # -- provenance: git where the tree is a checkout, else the stamp made by --prepare -------
    local fp commit=unknown clean=""
    fp=$(fingerprint)
    if in_git_checkout; then
        commit=$(git -C "$TREE" rev-parse --short HEAD)
        clean=1
        [[ -n "$(git -C "$TREE" status --porcelain)" ]] && { clean=0; commit+=-dirty; }
    elif [[ -f $TREE/.whl/STAMP ]]; then
        if [[ "$(sed -n 's/^fingerprint=//p' "$TREE/.whl/STAMP")" == "$fp" ]]; then
            commit=$(sed -n 's/^commit=//p' "$TREE/.whl/STAMP")
            clean=$(sed -n 's/^clean_tree=//p' "$TREE/.whl/STAMP")
        else
            commit=$(sed -n 's/^commit=//p' "$TREE/.whl/STAMP")
            commit="unknown (.whl/STAMP is for $commit, another tree)"
        fi
    fi
    export SAMFAST_COMMIT=$commit SAMFAST_CLEAN_TREE=$clean SAMFAST_TREE_FINGERPRINT=$fp
    say "commit $commit, clean tree ${clean:-unknown}, source fingerprint $fp"

    # -- the machine -----------------------------------------------------------------------------
    if command -v nvidia-smi >/dev/null; then
        timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
            --format=csv || say "nvidia-smi failed"
    else
        say "no nvidia-smi"
    fi
    command -v nvcc >/dev/null && nvcc --version | tail -2
    say "$(nproc) cores; $(uname -m)"
    timeout 30 "$PY" -c "
import importlib, sys, torch
print('python', sys.version.split()[0], sys.executable)
print('torch', torch.__version__, 'CUDA build', torch.version.cuda, '| CUDA available:',
      torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')
for name in ('triton', 'numpy', 'pytest', 'ninja', 'setuptools', 'pytest_timeout'):
    try:
        print(name, getattr(importlib.import_module(name), '__version__', '?'))
    except ImportError:
        print(name, 'MISSING')
" || say "python3 with torch did not start"

    # -- wheels carried in .whl/ (pytorch-optimizer) ----------------------------------------------
    local pypath=$SITE
    if compgen -G "$TREE/.whl/*.whl" >/dev/null; then
        if timeout 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$WHEELS" "$TREE"/.whl/*.whl >"$LOGS/wheels.log" 2>&1; then
            pypath=$SITE:$WHEELS
            say "wheels installed into $WHEELS: $(cd "$TREE/.whl" && ls -- *.whl | tr '\n' ' ')"
        else
            say "carried wheels did not install (logs/wheels.log): $(tail -1 "$LOGS/wheels.log")"
        fi
    else
        say "no .whl/ carried: pytorch-optimizer's SAM is timed only if python3 has it"
    fi
    # A developer's python may hold samfast as an editable install: its import hook answers
    # for samfast.* modules the target dir lacks (samfast._C on the JIT route), from the
    # checkout. Where there is one, a sitecustomize on PYTHONPATH removes the hook (python3
    # on the device has no samfast, so there nothing is shadowed).
    if "$PY" -c "
import sys
sys.exit(not any('__editable__' in m and 'samfast' in m
                 for m in (getattr(f, '__module__', '') for f in sys.meta_path)))" 2>/dev/null
    then
        mkdir -p "$WORK/guard"
        cat >"$WORK/guard/sitecustomize.py" <<'GUARD'
import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if not ("__editable__" in getattr(f, "__module__", "")
                            and "samfast" in getattr(f, "__module__", ""))]
GUARD
        pypath=$WORK/guard:$pypath
        say "$PY has samfast installed editable: its import hook is disabled for this run"
    fi
    export PYTHONPATH=$pypath
    export OUT=$RES  # the benchmarks' --save writes here (bench/common.py write_results)

    # -- build and prove the import ---------------------------------------------------------------
    build 120
    if ! run_section import-check 15 "$PY" "$TREE/bench/gpu_check_report.py" build \
        --site "$SITE" --route "$BUILD_ROUTE" --device "$device"; then
        if grep -q "WRONG IMPORT" "$LOGS/import-check.log"; then
            say "ABORT: samfast was not imported from $SITE; nothing else is run"
            finish "$device"
            return 1
        fi
    fi

    # -- tests ------------------------------------------------------------------------------------
    # Copied next to the scratch cwd (rootdir there): pytest puts no tree path on sys.path.
    cp -r "$TREE/tests" "$TREE/pyproject.toml" "$RUN_DIR/"
    local tests=${GPU_CHECK_TESTS:-tests/test_cuda.py tests/test_kernels.py tests/test_doctor.py}
    local opts=()
    # A hanging test fails alone (pytest-timeout) instead of costing the section's report;
    # one pytest-xdist worker per file runs the files side by side, each file in its order.
    "$PY" -c "import pytest_timeout" 2>/dev/null && opts+=(--timeout 60)
    ((DRY_RUN)) || { "$PY" -c "import xdist" 2>/dev/null && opts+=(-n 3 --dist loadfile); }
    # shellcheck disable=SC2086  # the test list splits on spaces
    run_section tests 90 "$PY" -m pytest -v -rfEs -p no:cacheprovider --durations=15 \
        --junitxml="$RES/tests-junit.xml" -o junit_family=xunit2 "${opts[@]}" $tests

    # -- doctor and benchmarks --------------------------------------------------------------------
    local b=$TREE/bench
    if ((DRY_RUN)); then
        run_section doctor 25 "$PY" -m samfast --json "$RES/doctor-report.json" --n 4099
        run_section optimizer-step-fp32 20 "$PY" "$b/bench_optimizer_step.py" --device cpu \
            --models small_cnn --rounds 2 --save
        run_section optimizer-step-bf16 20 "$PY" "$b/bench_optimizer_step.py" --device cpu \
            --models small_cnn --rounds 2 --dtype bf16 --save
        run_section train-step 40 "$PY" "$b/bench_train_step.py" --device cpu --amp bf16 \
            --cuda-graph --models small_cnn --batch-size 8 --rounds 1 --memory-models small_cnn \
            --save
        run_section grad-path 25 "$PY" "$b/bench_grad_path.py" --device cpu --model small_cnn \
            --batch-size 16 --rounds 2 --warmup 1 --save
        run_section pgd 15 "$PY" "$b/bench_pgd.py" --device cpu --models small_cnn \
            --batch-size 8 --steps 2 --rounds 1 --save
        run_section hvp 25 "$PY" "$b/bench_sharpness.py" --device cpu --hvp-only \
            --model small_cnn --samples 64 --train-subset 256 --train-epochs 1 --rounds 1 --save
        run_section ddp-gloo 25 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
            "$b/bench_ddp.py" --device cpu --model small_cnn --batch-size 16 --steps 2 \
            --rounds 1 --save
    else
        run_section doctor 25 "$PY" -m samfast --json "$RES/doctor-report.json"
        run_section optimizer-step-fp32 20 "$PY" "$b/bench_optimizer_step.py" --device cuda \
            --models wrn16_8 resnet20 --rounds 25 --save
        run_section optimizer-step-bf16 20 "$PY" "$b/bench_optimizer_step.py" --device cuda \
            --models wrn16_8 resnet20 --rounds 25 --dtype bf16 --save
        run_section train-step 40 "$PY" "$b/bench_train_step.py" --device cuda --amp bf16 \
            --cuda-graph --models resnet20 wrn16_8 --rounds 15 --memory-models wrn16_8 --save
        run_section grad-path 25 "$PY" "$b/bench_grad_path.py" --device cuda --rounds 15 --save
        run_section pgd 15 "$PY" "$b/bench_pgd.py" --device cuda --rounds 7 --save
        run_section hvp 25 "$PY" "$b/bench_sharpness.py" --device cuda --hvp-only \
            --model resnet20 --samples 512 --train-epochs 1 --rounds 5 --save
        run_section ddp-nccl 25 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
            "$b/bench_ddp.py" --device cuda --steps 5 --rounds 10 --save
    fi
    finish "$device"
    if ((FAILED)); then say "== done: SOME SECTIONS FAILED (see summary.md)"
    else say "== done: every section ok"; fi
    return "$FAILED"
}

finish() {  # results files + summary, then pack; runs even when sections failed
    say "== report"
    (cd "$RUN_DIR" && timeout -k 5 25 "$PY" "$TREE/bench/gpu_check_report.py" finish \
        --res "$RES" --top "$TOP" --device "$1") 2>&1 || { say "report FAILED"; FAILED=1; }
    tar -C "$RES" -czf "$TOP/results.tar.gz" . || FAILED=1
    say "== $TOP: $(cd "$TOP" && du -ch -- * | tail -1 | cut -f1) in $(ls "$TOP" | tr '\n' ' ')"
}

main 2>&1 | tee "$TOP/raw.log"
rc=${PIPESTATUS[0]}
[[ ${KEEP_WORK:-0} == 1 ]] || rm -rf "$WORK"
exit "$rc"
