"""Codelet code generation: IR → LLVM IR (`llvm`), cycle costs (`cost`), JIT + cache (`jit`)."""
