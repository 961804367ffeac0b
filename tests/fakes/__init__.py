"""Test inputs and stand-ins for services the CPU test machine lacks (an SGLang engine and server)."""
