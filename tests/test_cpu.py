"""What the code reads of the CPU: the model and the ISA that decide int8 and bf16 behaviour."""

from __future__ import annotations

from pipeline.core.cpu import cpu_info, parse_cpuinfo

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi2 sha_ni
processor\t: 1
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi2 sha_ni avx512f
"""
ZEN4 = """processor\t: 0
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni avx512_bitalg
"""


def test_an_avx2_only_cpu_has_neither_vnni_nor_bf16():
    info = parse_cpuinfo(ZEN3)
    assert info == {"model": "AMD EPYC 7B13 64-Core Processor", "isa": ["avx2", "fma"]}  # first processor only


def test_an_avx512_cpu_lists_vnni_and_bf16_in_a_fixed_order():
    assert parse_cpuinfo(ZEN4)["isa"] == ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"]


def test_this_machine_is_described_consistently():
    info = cpu_info()
    assert info["model"]
    assert info["vnni"] == bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(info["isa"]))
    assert info["bf16"] == bool({"avx512_bf16", "amx_bf16"} & set(info["isa"]))
