"""Orchestrator files in deploy/: shape checks only (no MONAI Deploy Workflow Manager runs here).

The Workflow Manager definition is UNTESTED against a running Workflow Manager / Informatics Gateway: these tests
check its structure against the Clinical Workflow Specification (monai-deploy-workflow-manager,
guidelines/mwm-workflow-spec.md) and against our MAP's conventions. The Orthanc auto-routing script is tested for
real in test_pacs_dimse.py.
"""

from __future__ import annotations

import json
import re

from conftest import ROOT

WORKFLOW = ROOT / "deploy" / "workflow_manager" / "calcimap-workflow.json"
TASK_TYPES = {"router", "export", "docker", "argo", "aide_clinical_review"}


def test_workflow_definition_shape():
    wf = json.loads(WORKFLOW.read_text())
    assert set(wf) == {"name", "version", "description", "informatics_gateway", "tasks"}
    assert len(wf["name"]) <= 15 and len(wf["description"]) <= 200  # the spec's limits
    ig = wf["informatics_gateway"]
    assert ig["ae_title"] and ig["export_destinations"] == ["ORTHANC"]
    tasks = {t["id"]: t for t in wf["tasks"]}
    assert len(tasks) == len(wf["tasks"]) and {t["type"] for t in wf["tasks"]} <= TASK_TYPES
    for task in wf["tasks"]:  # every destination names a task of this workflow
        assert {d["name"] for d in task.get("task_destinations", [])} <= set(tasks)
    app = tasks["calcimap"]
    assert app["type"] == "docker" and app["args"]["command"] == "python3 -u /opt/holoscan/app"
    assert app["args"]["container_image"].startswith("calcimap-")
    inputs = {a["name"]: a["value"] for a in app["artifacts"]["input"]}
    assert inputs == {"env_HOLOSCAN_INPUT_PATH": "{{ context.input.dicom }}"}
    assert [a["name"] for a in app["artifacts"]["output"]] == ["env_HOLOSCAN_OUTPUT_PATH"]
    assert all(f"env_HOLOSCAN_{k}_PATH" in app["args"] for k in ("INPUT", "OUTPUT", "MODEL"))
    export = tasks["export-results"]
    assert export["type"] == "export"
    assert [d["Name"] for d in export["export_destinations"]] == ig["export_destinations"]
    ref = export["artifacts"]["input"][0]["value"]
    assert re.fullmatch(r"\{\{ context\.executions\.calcimap\.artifacts\.env_HOLOSCAN_OUTPUT_PATH \}\}", ref)
    assert tasks["router"]["task_destinations"][0]["name"] == "calcimap"


def test_autorouting_script_routes_only_ct_to_the_registered_modality():
    lua = (ROOT / "deploy" / "orthanc" / "autorouting.lua").read_text()
    assert "function OnStableSeries(seriesId, tags, metadata)" in lua
    assert "if tags['Modality'] == 'CT' then" in lua  # our SEG/SR/DOC results never go round again
    assert "CALCIMAP_MODALITY = 'calcimap'" in lua
