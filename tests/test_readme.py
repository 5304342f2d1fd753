"""The README's ringcore example runs as printed."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_example_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    # the example prints the record count and the ring's query values
    assert out.stdout.startswith("4000 ringcore.RingQuery("), out.stdout
    assert "submitted=4000" in out.stdout


def test_readme_configuration_reference_lists_every_key():
    from service.settings import SPEC, builtin_toml

    text = (ROOT / "README.md").read_text()
    defaults = builtin_toml()
    for section, keys in SPEC.items():
        for key in keys:
            row = f"| `{section}.{key}` |"
            assert row in text, f"README's configuration table misses {section}.{key}"
            line = next(li for li in text.splitlines() if li.startswith(row))
            assert f"`RINGSTREAM_{section.upper()}_{key.upper()}`" in line
            value = defaults[section][key]
            if isinstance(value, bool):
                shown = "true" if value else "false"
            else:
                shown = repr(value).replace("'", '"')
            if value not in ("", []):
                assert f"`{shown}`" in line, f"{section}.{key}: default {shown} not in {line}"
