"""``junit.xml``: one test case per (variant, gate), so CI systems show which gate failed.

Test suites are variants (plus ``export`` for parity); a failed gate is a ``<failure>`` whose
message says the value and the threshold. Written with ``xml.etree`` (escaping is its job).

Example::

    write_junit(Path("runs/r1/junit.xml"), json.loads(Path("runs/r1/results.json").read_text()))
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from quant.support.files import atomic_write_bytes


def _gate_name(gate: dict) -> str:
    threshold = "n/a" if gate["threshold"] is None else f"{gate['threshold']:.6g}"
    return f"{gate['metric']} {gate['op']} {threshold}" + (" (regression)" if gate["kind"] == "regression" else "")


def _suite(root: ET.Element, name: str, gates: list[dict]) -> None:
    failures = sum(not g["passed"] for g in gates)
    suite = ET.SubElement(root, "testsuite", name=name, tests=str(len(gates)), failures=str(failures), errors="0")
    for gate in gates:
        case = ET.SubElement(suite, "testcase", classname=f"quant-audit.{name}", name=_gate_name(gate))
        value = "n/a" if gate["value"] is None else f"{gate['value']:.6g}"
        if not gate["passed"]:
            failure = ET.SubElement(case, "failure", message=gate["reason"] or f"value {value}", type=gate["kind"])
            failure.text = f"{name}: {_gate_name(gate)}; measured {value}. {gate['reason']}"
        else:
            ET.SubElement(case, "system-out").text = f"measured {value}"


def write_junit(path: Path, results: dict) -> None:
    """Write the JUnit XML of ``results`` (``results.json``'s content) to ``path``."""
    root = ET.Element("testsuites", name=f"quant-audit {results['run_id']}")
    if results.get("parity_gates"):
        _suite(root, "export", results["parity_gates"])
    for variant in results["variants"]:
        _suite(root, variant["name"], variant["gates"])
    if results.get("search_gates"):  # a search that found no passing mix
        _suite(root, "search", results["search_gates"])
    root.set("tests", str(sum(int(s.get("tests")) for s in root)))
    root.set("failures", str(sum(int(s.get("failures")) for s in root)))
    ET.indent(root)
    atomic_write_bytes(path, ET.tostring(root, encoding="utf-8", xml_declaration=True))
