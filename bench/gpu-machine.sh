#!/usr/bin/env bash
# Issue 14's and issue 24's checks on a real GPU, from what bench/gpu-pack.sh wrote into .gpu/ and
# .gpu-cuda/, over consecutive calls of the device tool (each carries at most 64 MiB; the machine
# stays warm 30 s between calls, and keeps /opt and the repo copy's ignored files meanwhile).
# bench/GPU-CALLS.md lists the calls. Each stage runs under its own time limit and leaves its log
# in $OUT. Usage (repo root):
#   OUT=dir bash bench/gpu-machine.sh unpack     # call 1, carrying .gpu: Node, node_modules, llama.cpp, Vulkan loader, ../shared
#   bash bench/gpu-machine.sh part N             # calls 2-4 (N = 0, 1, 2): carrying .gpu-cuda/N, one part of the CUDA provider's tarball
#   OUT=dir bash bench/gpu-machine.sh cuda       # after the last part: reassemble, setup-cuda --from, the CUDA checks and bench
#   OUT=dir bash bench/gpu-machine.sh webgpu     # the WebGPU stages (issue 14): tests on the real adapter, the 1B bench
#   OUT=dir bash bench/gpu-machine.sh all        # unpack + webgpu's 135M bench, tests and 1B bench in one call (the old plan)
# DRY_RUN=1 (a machine without a GPU) leaves / alone: no dpkg -x, no ldconfig.
set -u
OUT=${OUT:-/tmp/gpu-out}
ROOT=${GPU_ROOT:-/opt/reft}
mkdir -p "$OUT" "$ROOT"
t0=$(date +%s)
stage() { echo "== $(($(date +%s) - t0)) s: $*"; }
export PATH=$ROOT/node/bin:$PATH

# What call 1 unpacked, linked into this call's copy of the repo (the copy may be laid anew)
link() {
  [ -x "$ROOT/node/bin/node" ] && [ -d "$ROOT/node_modules" ] || {
    echo "nothing unpacked in $ROOT: run 'bench/gpu-machine.sh unpack' first (the machine was given back?)"
    exit 3
  }
  [ -e node_modules ] || ln -s "$ROOT/node_modules" node_modules
  mkdir -p bench/.work
  [ -e bench/.work/llama-vulkan ] || ln -s "$ROOT/llama-vulkan" bench/.work/llama-vulkan
  [ -e ../shared ] || ln -s "$ROOT/shared" ../shared
  icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  [ -f "$icd" ] && export VK_DRIVER_FILES=$icd
  return 0
}

unpack() {
  stage unpack
  if [ -z "${DRY_RUN:-}" ]; then
    for f in .gpu/gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
  fi
  mkdir -p "$ROOT/node/bin" "$ROOT/llama-vulkan" "$ROOT/shared"
  tar -xJf .gpu/node.tar.xz -C "$ROOT/node/bin"
  tar -xJf .gpu/nm.tar.xz -C "$ROOT"
  tar -xJf .gpu/llama.tar.xz -C "$ROOT/llama-vulkan"
  tar -xJf .gpu/shared.tar.xz -C "$ROOT/shared"
  link
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  node --version
  lscpu | grep -E 'Model name|^CPU\(s\)'
  du -sh "$ROOT"
}

# One part of the provider's tarball into $ROOT/cuda, checked against the SHA-256 packed with it
part() {
  local n=$1
  stage "part $n"
  mkdir -p "$ROOT/cuda"
  cp .gpu-cuda/"$n"/part."$n" .gpu-cuda/"$n"/SHA256SUMS "$ROOT/cuda/" || exit 4
  (cd "$ROOT/cuda" && grep " part\.$n\$" SHA256SUMS | sha256sum -c -) || exit 4
  ls -l "$ROOT/cuda"
}

# pip's CUDA 13 libraries (nvidia-cublas, nvidia-curand, nvidia-cuda-runtime) as the image has them
cuda_lib_dir() {
  python3 -c 'import glob, os, sys
for d in [os.path.join(p, "nvidia", "cu13", "lib") for p in sys.path]:
    if os.path.exists(os.path.join(d, "libcublasLt.so.13")): print(d); break' 2>/dev/null
}

cuda() {
  link
  stage "cuda: reassemble the provider's tarball"
  cd "$ROOT/cuda" || exit 5
  cat $(grep -o 'part\.[0-9]*$' SHA256SUMS | sort -t. -k2 -n) >provider.tgz
  grep ' provider\.tgz$' SHA256SUMS | sha256sum -c - || exit 5
  cd - >/dev/null
  stage 'cuda: setup-cuda --from the tarball (checks the registry integrity, SHA-256s, ORT version)'
  timeout -k 5 120 node bin/reft-server.js setup-cuda --from "$ROOT/cuda/provider.tgz" --no-check 2>&1 | tee "$OUT/setup-cuda.log"
  CU13=$(cuda_lib_dir)
  echo "pip's CUDA 13 libraries: ${CU13:-none found}"
  ls "$CU13" 2>/dev/null | grep -E 'cublas|curand|cudart' | tr '\n' ' '
  echo
  ldconfig -p | grep -E 'libcuda\.so\.1|libcublasLt\.so\.13' | head -3

  stage 'cuda: the one-line errors and --cuda-lib-dir'
  {
    g=(generate --model ../shared/models/stories260k --prompt 'Once upon a time' --max-new-tokens 12)
    echo '-- setup-cuda check with --cuda-lib-dir'
    timeout -k 5 45 node bin/reft-server.js setup-cuda --from "$ROOT/cuda/provider.tgz" --cuda-lib-dir "$CU13"
    echo '-- generate --device cuda, no --cuda-lib-dir, no LD_LIBRARY_PATH'
    env -u LD_LIBRARY_PATH timeout -k 5 45 node bin/reft-server.js "${g[@]}" --device cuda
    echo "exit $?"
    echo '-- the same with CUDA_VISIBLE_DEVICES= (no device)'
    CUDA_VISIBLE_DEVICES= timeout -k 5 45 node bin/reft-server.js "${g[@]}" --device cuda --cuda-lib-dir "$CU13"
    echo "exit $?"
    echo '-- generate --device cuda --cuda-lib-dir (the libraries loaded by path)'
    timeout -k 5 60 node bin/reft-server.js "${g[@]}" --device cuda --cuda-lib-dir "$CU13"
    echo "exit $?"
    echo '-- generate --device auto --cuda-lib-dir'
    timeout -k 5 60 node bin/reft-server.js "${g[@]}" --cuda-lib-dir "$CU13"
    echo "exit $?"
  } >"$OUT/cuda-errors.log" 2>&1
  cat "$OUT/cuda-errors.log"

  # from here on every process finds them (the node placement's child, llama.cpp's own loads)
  export LD_LIBRARY_PATH=$CU13${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  stage 'cuda: the reference cases on CUDA against the CPU and the PyTorch reference'
  timeout -k 5 "${CHECK_SECONDS:-150}" node --import tsx bench/cuda-check.ts cuda >"$OUT/cuda-check.log" 2>&1
  echo "exit $?"
  grep -vE '^\{' "$OUT/cuda-check.log" | tail -25

  # ours on CUDA beside ours on WebGPU (when Vulkan shows a hardware adapter) and llama.cpp's Vulkan build
  devices=cuda
  VK_LOADER_DEBUG=driver timeout -k 5 60 node --import tsx --input-type=module \
    -e "const d = await import('./src/runtime/device.ts'); const p = await d.resolveDevice('webgpu'); console.log('webgpu adapter:', p.adapter)" \
    >"$OUT/adapter.log" 2>&1 && ! grep -q 'software)' "$OUT/adapter.log" && devices=cuda,webgpu
  grep 'webgpu adapter' "$OUT/adapter.log"
  bench smol135m "${BENCH_135M_SECONDS:-240}" "$devices"
  stage done
}

bench() {
  stage "bench $1 on $3"
  # npm run bench's command (npm itself is not carried)
  BENCH_GPU_MODEL=$1 BENCH_GPU_DEVICES=$3 GLIBC_TUNABLES=glibc.malloc.hugetlb=1 timeout -k 5 "$2" \
    node --import tsx bench/run.ts gpu --device "${3%%,*}" >"$OUT/bench-$1-${3//,/-}.log" 2>&1
  echo "exit $?"
  grep -E '^(device|gpu):' "$OUT/bench-$1-${3//,/-}.log"
  tail -2 "$OUT/bench-$1-${3//,/-}.log"
  for f in bench/results/*-gpu.json bench/results/*-gpu.md; do [ -f "$f" ] && mv "$f" "$OUT/$(basename "${f%.*}")-$1.${f##*.}"; done
}

webgpu_stages() {
  link
  # for BENCH_1B_DEVICES=cuda,…: pip's CUDA 13 libraries, where the image has them
  CU13=$(cuda_lib_dir)
  [ -n "$CU13" ] && export LD_LIBRARY_PATH=$CU13${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  stage adapter
  VK_LOADER_DEBUG=driver timeout -k 5 60 node --import tsx --input-type=module \
    -e "const d = await import('./src/runtime/device.ts'); console.log(JSON.stringify(await d.resolveDevice('auto')), JSON.stringify(await d.resolveDevice('webgpu')))" \
    >"$OUT/adapter.log" 2>&1
  tail -3 "$OUT/adapter.log"
  [ "${1:-}" = with-135m ] && bench smol135m "${BENCH_135M_SECONDS:-150}" webgpu
  stage tests
  timeout -k 5 "${TEST_SECONDS:-130}" node node_modules/vitest/vitest.mjs run --fileParallelism --maxWorkers 5 test/webgpu-engine.test.ts test/webgpu-steer.test.ts test/webgpu-cache.test.ts \
    test/webgpu-training.test.ts test/webgpu-server.test.ts >"$OUT/tests.log" 2>&1
  echo "exit $?"
  grep -E 'Test Files|Tests |✗|×|FAIL' "$OUT/tests.log" | head -20
  bench llama1b "${BENCH_1B_SECONDS:-220}" "${BENCH_1B_DEVICES:-webgpu}"
  stage done
}

case "${1:-all}" in
  unpack) unpack ;;
  part) part "${2:?part number}" ;;
  cuda) cuda ;;
  webgpu) webgpu_stages ;;
  all) unpack && webgpu_stages with-135m ;;
  *) echo "usage: bench/gpu-machine.sh unpack|part N|cuda|webgpu|all" >&2 && exit 2 ;;
esac
