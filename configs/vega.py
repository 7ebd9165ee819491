"""Segmind-Vega: SDXL → 0.745 B parameters (every attention block halved again, mid block one resnet).

    python -m jaxdistill.train --config configs/vega.py --config.teacher=SDXL_DIR \
        --config.data.path=DATA_DIR --workdir runs/vega
"""

from jaxdistill.config import base_config


def get_config():
    c = base_config()
    c.plan = "vega"
    c.data.source = "prepared"  # a set from python -m jaxdistill.prepare: --config.data.path=DIR
    c.scan_layers = False  # faster steps on accelerators, as in configs/ssd1b.py
    return c
