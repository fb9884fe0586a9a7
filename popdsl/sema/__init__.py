"""Semantic checks: imports, codelets (→ codelet IR), declarations."""
from popdsl.sema.program import Program, check_program, compile_codelets, load_program

__all__ = ["Program", "check_program", "compile_codelets", "load_program"]
