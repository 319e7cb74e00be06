#!/usr/bin/env bash
# The main job on the bundled sample: set up, train SMAI (CPU preset) on sample_data/hazelnut_toy,
# test it (image AUROC, pixel AUROC, PRO) and write anomaly-map pictures under results/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/anomalib train --config configs/smai_cpu.yaml \
  --data.root sample_data --data.category hazelnut_toy \
  --default_root_dir results/demo
echo "Anomaly-map pictures: $(ls -d results/demo/Smai/MVTecAD/hazelnut_toy/latest/images)"
