#!/usr/bin/env bash
# Issue 14's checks on a real GPU, from the bundle bench/gpu-pack.sh wrote into .gpu/: unpacks
# Node.js, node_modules, llama.cpp's Vulkan build, the Vulkan loader and ../shared; then, each
# stage under its own time limit and each leaving its log in $OUT, runs the GPU benchmark on
# SmolLM2-135M's shapes, the WebGPU tests on the real adapter, and the benchmark on
# Llama-3.2-1B's shapes. Usage (repo root): OUT=dir bash bench/gpu-machine.sh
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
t0=$(date +%s)
stage() { echo "== $(($(date +%s) - t0)) s: $*"; }

stage unpack
for f in .gpu/gl/*.deb; do dpkg -x "$f" /; done
ldconfig
mkdir -p /opt/node/bin && tar -xJf .gpu/node.tar.xz -C /opt/node/bin
export PATH=/opt/node/bin:$PATH
tar -xJf .gpu/nm.tar.xz
mkdir -p bench/.work/llama-vulkan ../shared
tar -xJf .gpu/llama.tar.xz -C bench/.work/llama-vulkan
tar -xJf .gpu/shared.tar.xz -C ../shared
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -f "$icd" ] && export VK_DRIVER_FILES=$icd
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
node --version
lscpu | grep -E 'Model name|^CPU\(s\)'

stage adapter
VK_LOADER_DEBUG=driver timeout -k 5 60 node --import tsx --input-type=module \
  -e "const d = await import('./src/runtime/device.ts'); console.log(JSON.stringify(await d.resolveDevice('auto')), JSON.stringify(await d.resolveDevice('webgpu')))" \
  >"$OUT/adapter.log" 2>&1
tail -3 "$OUT/adapter.log"

bench() {
  stage "bench ${1}"
  # npm run bench's command (npm itself is not carried)
  BENCH_GPU_MODEL=$1 GLIBC_TUNABLES=glibc.malloc.hugetlb=1 timeout -k 5 "$2" node --import tsx bench/run.ts gpu --device webgpu >"$OUT/bench-$1.log" 2>&1
  echo "exit $?"
  grep -E '^(device|gpu):' "$OUT/bench-$1.log"
  tail -2 "$OUT/bench-$1.log"
  for f in bench/results/*-gpu.json bench/results/*-gpu.md; do [ -f "$f" ] && mv "$f" "$OUT/$(basename "${f%.*}")-$1.${f##*.}"; done
}
bench smol135m "${BENCH_135M_SECONDS:-150}"

stage tests
timeout -k 5 "${TEST_SECONDS:-130}" node node_modules/vitest/vitest.mjs run --fileParallelism --maxWorkers 5 test/webgpu-engine.test.ts test/webgpu-steer.test.ts test/webgpu-cache.test.ts \
  test/webgpu-training.test.ts test/webgpu-server.test.ts >"$OUT/tests.log" 2>&1
echo "exit $?"
grep -E 'Test Files|Tests |✗|×|FAIL' "$OUT/tests.log" | head -20

bench llama1b "${BENCH_1B_SECONDS:-220}"
stage done
