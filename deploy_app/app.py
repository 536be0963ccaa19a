"""CalciMap as a MONAI Deploy application: the operator graph (see :mod:`deploy_app.operators`).

Run it through the command line (:mod:`deploy_app.cli`), which checks the input, the models and the output
folder before the graph runs; :class:`CalciMapApp` expects those checks done and takes their results.
"""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application

from deploy_app.operators import (
    CalciumPathOperator,
    ReportWriterOperator,
    RunState,
    SeriesSelectorOperator,
    StudyLoaderOperator,
)
from deploy_app.pipeline import Models


class CalciMapApp(Application):
    """DICOM study in; DICOM SEG, TID 1500 SR, PDF report and results.json out."""

    name = "calcimap"
    description = "Coronary and intracranial ICA calcium scoring on non-contrast CT (research use only)."

    def __init__(
        self,
        *args,
        input_folder: Path,
        output_folder: Path,
        models: Models,
        manifest: dict,
        rules: dict,
        limits: dict,
        secondary_capture: bool = False,
        **kwargs,
    ):
        self.input_folder, self.output_folder = Path(input_folder), Path(output_folder)
        self.models, self.manifest, self.rules, self.limits = models, manifest, rules, limits
        self.secondary_capture = secondary_capture
        self.state = RunState()
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(*args, **kwargs)

    def compose(self) -> None:
        self._logger.info("input %s, output %s", self.input_folder, self.output_folder)
        s = self.state
        loader = StudyLoaderOperator(
            self, CountCondition(self, 1), input_folder=self.input_folder, state=s, name="study_loader"
        )
        selector = SeriesSelectorOperator(self, rules=self.rules, state=s, name="series_selector")
        paths = {
            p: CalciumPathOperator(self, path=p, models=self.models, limits=self.limits, state=s, name=f"{p}_calcium")
            for p in ("coronary", "ica")
        }
        writer = ReportWriterOperator(
            self,
            output_folder=self.output_folder,
            manifest=self.manifest,
            secondary_capture=self.secondary_capture,
            state=s,
            name="report_writer",
        )
        self.add_flow(loader, selector, {("study", "study")})
        for p, op in paths.items():
            self.add_flow(selector, op, {("selection", "selection")})
            self.add_flow(op, writer, {("result", p)})
