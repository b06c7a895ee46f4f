"""What cifar_exp/hydra_private.py relies on in Hydra's private API: each test fails if Hydra
changes it (a rename, a signature, what it prints), before a user sees a traceback."""

from __future__ import annotations

import inspect

import hydra._internal.utils as hydra_utils
import pytest
from hydra.core.utils import JobReturn, JobStatus

from cifar_exp import hydra_private
from cifar_exp.errors import UserError
from cifar_exp.sweeps import Job


def test_the_command_line_entry_is_there_with_the_arguments_we_pass() -> None:
    assert callable(hydra_utils.get_args_parser)
    parameters = inspect.signature(hydra_utils._run_hydra).parameters
    assert {"args", "args_parser", "task_function", "config_path", "config_name"} <= set(parameters)


def test_hydra_reports_through_the_module_level_run_and_report_we_wrap() -> None:
    assert "run_and_report(" in inspect.getsource(hydra_utils._run_hydra)  # looked up at call time
    assert hydra_utils.run_and_report.__qualname__.startswith("report_in_one_line")  # ours, installed


def test_a_job_names_itself_after_the_function_its_task_wraps() -> None:
    """Hydra names the job (its log file, a SLURM job's name) after the task function's module; it
    unwraps __wrapped__ first, so Job(task) keeps the name @hydra.main would give."""

    def task(cfg, context):  # noqa: ANN001, ANN202
        return 0.0

    found = hydra_utils.detect_calling_file_or_module_from_task_function(Job(task))
    assert found == (None, __name__)


def failed(error: BaseException) -> JobReturn:
    return JobReturn(overrides=["model.conv1_out=0"], status=JobStatus.FAILED, _return_value=error)


def test_a_failed_jobs_error_is_read_without_a_line_printed(capsys: pytest.CaptureFixture[str]) -> None:
    error = UserError("model.conv1_out=0: must be in [1, 4096]")
    assert hydra_private.job_error(failed(error)) is error
    assert hydra_private.job_error(JobReturn(status=JobStatus.COMPLETED, _return_value=0.5)) is None
    with pytest.raises(UserError):
        failed(error).return_value  # noqa: B018  (what Hydra's run() and BasicSweeper do)
    assert capsys.readouterr().err == ""  # the one line is printed once, by errors.report_in_one_line


@pytest.mark.parametrize("full_error", [False, True])
def test_other_errors_keep_hydras_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, full_error: bool
) -> None:
    """A bug keeps Hydra's "Error executing job" line and traceback; HYDRA_FULL_ERROR=1 gives a user
    error the same."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1" if full_error else "0")
    error = UserError("a user error") if full_error else RuntimeError("a bug")
    with pytest.raises(type(error)):
        failed(error).return_value  # noqa: B018
    assert capsys.readouterr().err.startswith("Error executing job with overrides: ['model.conv1_out=0']")


def test_omegaconf_converts_every_bool_in_the_method_we_wrap() -> None:
    from omegaconf import OmegaConf
    from omegaconf.nodes import BooleanNode

    hydra_private.strict_bools()
    assert getattr(BooleanNode._validate_and_convert_impl, "strict", False)  # ours, installed
    with pytest.raises(Exception, match="use true or false"):
        OmegaConf.merge(OmegaConf.structured({"flip": BooleanNode(False)}), {"flip": -1})


def test_a_nodes_path_in_its_config_is_read_from_omegaconf() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"model": {"conv1_out": 6}, "trainer": {"lr": 0.1}})
    assert hydra_private.full_key(cfg.model) == "model"
    assert hydra_private.full_key(OmegaConf.create({"lr": 0.1})) == ""
    assert hydra_private.full_key(3) == ""
