"""Reproduction studies: named comparisons of methods over seeds, run by run, resumable.

`definitions.STUDIES` names them; `runner.StudyRunner` trains and collects them into
`results.json`; `tables` makes `results.md` and the plots from that file.
"""
