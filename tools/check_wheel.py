"""Check a repaired stochdepth wheel: the extension needs only system libraries, glibc <= 2.28.

    python tools/check_wheel.py WHEEL {cuda,cpu}

Run by tools/build-dist with the .venv-dist interpreter (pyelftools comes with auditwheel).
Fails when auditwheel grafted a library into the wheel, when the extension's NEEDED list holds
anything beyond glibc, libgcc_s and libstdc++ (the CUDA runtime must be linked statically), or
when the flavour is wrong: the CUDA wheel's static runtime must load the driver (libcuda.so.1)
at run time, and the CPU-only wheel must hold no CUDA code at all. The glibc floor
(docs/releasing.md, "Wheel compatibility"): the file name's platform tags are manylinux_2_28 or
lower, and no module in it needs a GLIBC version above 2.28 or leaves a symbol other than
Python's undefined without a version (one the link-time glibc 2.28 lacked). Prints what it read.
"""

import io
import re
import sys
import zipfile

from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

# The glibc floor the wheels are built for: manylinux_2_28 (tools/glibc-floor-libs).
GLIBC_FLOOR = (2, 28)

# What every manylinux policy lets a wheel take from the system (auditwheel's whitelist, the
# part an extension like this one can need).
SYSTEM = {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1",
          "libgcc_s.so.1", "libstdc++.so.6", "ld-linux-x86-64.so.2"}


def _needed_and_versions(data):
    elf = ELFFile(io.BytesIO(data))
    needed = []
    for section in elf.iter_sections():
        if isinstance(section, DynamicSection):
            needed += [tag.needed for tag in section.iter_tags() if tag.entry.d_tag == "DT_NEEDED"]
    versions = {}
    gnu_version_r = elf.get_section_by_name(".gnu.version_r")
    if gnu_version_r is not None:
        for _, auxiliaries in gnu_version_r.iter_versions():
            for aux in auxiliaries:
                m = re.fullmatch(r"(GLIBC|GLIBCXX|CXXABI|GCC)_([0-9.]+)", aux.name)
                if m:
                    key = tuple(int(x) for x in m.group(2).split("."))
                    versions[m.group(1)] = max(versions.get(m.group(1), key), key)
    return needed, versions


def _unversioned_undefined(data):
    """Undefined symbols bound to no version, but Python's (the interpreter provides them) and
    weak ones (allowed to stay unresolved)."""
    elf = ELFFile(io.BytesIO(data))
    dynsym = elf.get_section_by_name(".dynsym")
    gnu_version = elf.get_section_by_name(".gnu.version")
    names = []
    for i, sym in enumerate(dynsym.iter_symbols()):
        if sym["st_shndx"] != "SHN_UNDEF" or not sym.name or sym["st_info"]["bind"] == "STB_WEAK":
            continue
        versioned = gnu_version is not None and isinstance(gnu_version.get_symbol(i)["ndx"], int)
        if not versioned and not sym.name.startswith(("Py", "_Py")):
            names.append(sym.name)
    return names


def _floor_problems(path, modules):
    """The glibc floor: the wheel's platform tags and what each module needs (modules: name ->
    ELF bytes)."""
    problems = []
    floor = f"manylinux_{GLIBC_FLOOR[0]}_{GLIBC_FLOOR[1]}"
    platforms = path.rsplit("/", 1)[-1].removesuffix(".whl").split("-")[-1].split(".")
    for platform in platforms:
        m = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", platform)
        if not m or (int(m.group(1)), int(m.group(2))) > GLIBC_FLOOR:
            problems.append(f"platform tag {platform} is not {floor} or lower")
    for name, data in modules.items():
        _, versions = _needed_and_versions(data)
        if versions.get("GLIBC", (0,)) > GLIBC_FLOOR:
            glibc = ".".join(map(str, versions["GLIBC"]))
            problems.append(f"{name} needs GLIBC_{glibc}, above the {floor} floor")
        loose = _unversioned_undefined(data)
        if loose:
            problems.append(f"{name} leaves symbols undefined without a version: {loose}")
    return problems


def main(path, flavour):
    with zipfile.ZipFile(path) as whl:
        names = whl.namelist()
        grafted = [n for n in names if ".libs/" in n]
        cores = [n for n in names if re.fullmatch(r"stochdepth/_core\..*\.so", n)]
        if len(cores) != 1:
            raise SystemExit(f"{path}: expected one stochdepth/_core*.so, found {cores}")
        data = whl.read(cores[0])
        modules = {n: whl.read(n) for n in names if n.endswith(".so")}
    needed, versions = _needed_and_versions(data)
    newest = ", ".join(f"{k}_{'.'.join(map(str, v))}" for k, v in sorted(versions.items()))
    print(f"check_wheel: {cores[0]}\n  NEEDED: {', '.join(needed)}\n  newest versions: {newest}")
    problems = _floor_problems(path, modules)
    if grafted:
        problems.append(f"auditwheel grafted libraries into the wheel: {grafted}")
    test_only = [n for n in names if n.startswith("stochdepth/_cuda_emulator")]
    if test_only:
        problems.append(f"the tests' module is in a user's wheel: {test_only}")
    foreign = [lib for lib in needed if lib not in SYSTEM]
    if foreign:
        problems.append(f"NEEDED libraries beyond the system's: {foreign}")
    has_cuda = b"libcuda.so.1" in data
    has_fatbin = b".nv_fatbin" in data
    if flavour == "cuda" and not (has_cuda and has_fatbin):
        problems.append("the CUDA wheel holds no CUDA kernels or no libcuda.so.1 loader")
    if flavour == "cpu" and (has_cuda or has_fatbin):
        problems.append("the CPU-only wheel holds CUDA code")
    if problems:
        raise SystemExit(f"check_wheel: {path}:\n  " + "\n  ".join(problems))
    loaded = "libcuda.so.1 is loaded at run time (static CUDA runtime)" if has_cuda else "no CUDA"
    print(f"  ok: only system libraries, nothing grafted, {loaded}; "
          f"glibc <= {'.'.join(map(str, GLIBC_FLOOR))} in {', '.join(sorted(modules))}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[2] not in ("cuda", "cpu"):
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
