#!/usr/bin/env bash
# Packs what bench/gpu-machine.sh needs on a GPU machine that has no Node.js, no Vulkan loader and
# no registry (the H200 that the device tool lends): this machine's node binary, node_modules
# without what tests and benches never load there, node-llama-cpp's Vulkan build, Debian's Vulkan
# loader and GL dispatch libraries (for NVIDIA's ICD) and ../shared's model and fixtures, all into
# .gpu/ (ignored by git), xz-compressed to stay under the tool's 64 MiB. Run from the repo root.
set -euo pipefail
mkdir -p .gpu/gl .git/info
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude

tar -C "$(dirname "$(readlink -f "$(command -v node)")")" -cf - node | xz -9 -T0 >.gpu/node.tar.xz

skip=(typescript playwright-core prettier openai @types protobufjs/cli better-sqlite3/deps better-sqlite3/src
  better-sqlite3/build/Release/obj better-sqlite3/build/Release/obj.target better-sqlite3/build/Release/sqlite3.a
  onnxruntime-node/bin/napi-v6/darwin onnxruntime-node/bin/napi-v6/win32 onnxruntime-node/bin/napi-v6/linux/arm64 .cache)
tar -cf - "${skip[@]/#/--exclude=node_modules/}" --exclude='*.d.ts' --exclude='*.d.mts' --exclude='*.d.cts' --exclude='*.map' \
  node_modules | xz -9 -T0 >.gpu/nm.tar.xz

# node-llama-cpp with its Vulkan binary, installed as the bench installs it; ggml's CPU variants
# beyond the common ones are left out (every layer runs on the GPU)
llama=bench/.work/llama-vulkan
node --import tsx -e "await (await import('./bench/llama-cpp.ts')).nodeLlamaCpp('$llama', 1, 'vulkan').then((l) => l.dispose())"
cpu=$llama/node_modules/@node-llama-cpp/linux-x64-vulkan/bins/linux-x64-vulkan
exclude=(--exclude=node_modules/node-llama-cpp/llama/gitRelease.bundle --exclude='*.d.ts' --exclude='*.map')
for c in alderlake cannonlake cascadelake cooperlake icelake ivybridge piledriver sandybridge skylakex; do
  exclude+=("--exclude=${cpu#$llama/}/libggml-cpu-$c.so")
done
tar -C "$llama" -cf - "${exclude[@]}" package.json node_modules | xz -9 -T0 >.gpu/llama.tar.xz

o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
mkdir -p /tmp/amd64/partial
apt-get "${o[@]}" update >/dev/null
(cd .gpu/gl && apt-get "${o[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)

tar -C ../shared -cJf .gpu/shared.tar.xz REFT.md models/stories260k fixtures/reference.json fixtures/reference.safetensors fixtures/steer tools
du -ch .gpu/*.xz .gpu/gl | tail -1
