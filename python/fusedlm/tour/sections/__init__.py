"""The tour's sections, one module each, in report order (see run.SECTIONS): ``run(ctx) ->
report.Section``. A section imports the base packages it shows (fusedlm.peft, generation,
training) at its top, so a missing one makes the section report itself "not available"."""
