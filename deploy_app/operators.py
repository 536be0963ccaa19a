"""The app's operators: thin MONAI Deploy (Holoscan) wrappers around the stages of :mod:`deploy_app.pipeline`.

Graph: StudyLoader -> SeriesSelector -> CalciumPath("coronary"), CalciumPath("ica") -> ReportWriter.
An exception inside a Holoscan operator ends in pages of executor errors, so each operator catches what it
raises, records it in the shared :class:`RunState` and emits nothing further; the command line reads the state
after the graph has run and turns it into one line and an exit code.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.deploy.core import Fragment, Operator, OperatorSpec

from deploy_app import pipeline
from deploy_app.outputs import write_outputs
from deploy_app.report import build_report
from deploy_app.study import read_study


@dataclass
class RunState:
    """What the graph's run left for the caller: the error (if any), the written files and the report."""

    error: BaseException | None = None
    failed_stage: str | None = None
    written: list[Path] = field(default_factory=list)
    report: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)


class _Stage(Operator):
    """Base: named logger, shared state, and ``run_stage`` that records instead of raising."""

    def __init__(self, fragment: Fragment, *args: Any, state: RunState, **kwargs: Any):
        self.state = state
        self.logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def run_stage(self, name: str, fn, *args: Any) -> Any:
        if self.state.error is not None:
            return None
        start = time.perf_counter()
        try:
            return fn(*args)
        except Exception as e:  # recorded for the command line (see the module docstring)
            self.logger.debug("stage %s failed", name, exc_info=True)
            self.state.error, self.state.failed_stage = e, name
            return None
        finally:
            self.state.timings[name] = round(time.perf_counter() - start, 4)


class StudyLoaderOperator(_Stage):
    """Reads the input folder as one DICOM study.

    Named output:
        study: :class:`deploy_app.study.Study`, every instance of the study grouped by series.
    """

    def __init__(self, fragment: Fragment, *args: Any, input_folder: Path, state: RunState, **kwargs: Any):
        self.input_folder = Path(input_folder)
        super().__init__(fragment, *args, state=state, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("study")

    def compute(self, op_input, op_output, context) -> None:
        study = self.run_stage("load", read_study, self.input_folder)
        if study is not None:
            op_output.emit(study, "study")


class SeriesSelectorOperator(_Stage):
    """Chooses the series of each path by the rules in ``configs/series_selection.json``.

    Named input:
        study: the study.
    Named outputs:
        selection: {"study": the study, "choices": {"coronary": SeriesChoice | None, "ica": SeriesChoice | None}}
    """

    def __init__(self, fragment: Fragment, *args: Any, rules: dict, state: RunState, **kwargs: Any):
        self.rules = rules
        super().__init__(fragment, *args, state=state, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study")
        spec.output("selection")

    def compute(self, op_input, op_output, context) -> None:
        study = op_input.receive("study")
        choices = self.run_stage("select", pipeline.select, study, self.rules)
        if choices is not None:
            op_output.emit({"study": study, "choices": choices}, "selection")


class CalciumPathOperator(_Stage):
    """One path (coronary or ICA): strict volume, quality checks, the models, the scorer.

    Named input:
        selection: from :class:`SeriesSelectorOperator`.
    Named output:
        result: {"path": name, "result": PathResult | None (no series for this path)}
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        path: str,
        models: pipeline.Models,
        limits: dict,
        state: RunState,
        **kwargs: Any,
    ):
        if path not in pipeline.PATHS:
            raise ValueError(f"path must be one of {pipeline.PATHS}, got {path!r}")
        self.path, self.models, self.limits = path, models, limits
        super().__init__(fragment, *args, state=state, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("selection")
        spec.output("result")

    def compute(self, op_input, op_output, context) -> None:
        selection = op_input.receive("selection")
        choice = selection["choices"][self.path]
        result = self.run_stage(self.path, pipeline.run_path, self.path, choice, self.models, self.limits)
        if self.state.error is None:
            op_output.emit({"path": self.path, "result": result, "study": selection["study"]}, "result")


class ReportWriterOperator(_Stage):
    """Writes the SEGs, SRs, the optional Secondary Capture series, the PDF report (file and DICOM) and results.json,
    all-or-nothing.

    Named inputs:
        coronary, ica: from the two :class:`CalciumPathOperator`.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        output_folder: Path,
        manifest: dict,
        state: RunState,
        secondary_capture: bool = False,
        **kwargs: Any,
    ):
        self.output_folder = Path(output_folder)
        self.manifest = manifest
        self.secondary_capture = secondary_capture
        super().__init__(fragment, *args, state=state, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("coronary")
        spec.input("ica")

    def _write(self, coronary: dict, ica: dict) -> list[Path]:
        results = {"coronary": coronary["result"], "ica": ica["result"]}
        report = build_report(coronary["study"], results, self.manifest, self.state.timings)
        self.state.report = report
        return write_outputs(self.output_folder, coronary["study"], results, report, self.secondary_capture)

    def compute(self, op_input, op_output, context) -> None:
        coronary, ica = op_input.receive("coronary"), op_input.receive("ica")
        written = self.run_stage("write", self._write, coronary, ica)
        if written is not None:
            self.state.written = written
