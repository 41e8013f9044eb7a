# The C++ core (src/stochdepth) and its per-ISA units: the ONE list of its sources and of the
# flags each ISA unit gets. Included by CMakeLists.txt (the Python module) and by
# tests/cpp/CMakeLists.txt (the C++ tests, built natively and cross-compiled for aarch64).
#   x86-64   cpu_avx2.cc (-mavx2 -mfma -mf16c), cpu_avx512.cc and cpu_avx512_bf16.cc
#            (+ AVX-512 F/BW/DQ/VL, and AVX512_BF16 for the second); chosen at run time by CPUID
#   aarch64  cpu_neon.cc, no flags: NEON is baseline there
# No unit gets -march=native: a wheel must run on any CPU of its architecture.
option(STOCHDEPTH_AVX2 "Compile the AVX2/FMA/F16C kernels (x86-64; chosen at run time)" ON)
option(STOCHDEPTH_AVX512 "Compile the AVX-512 kernels (x86-64; chosen at run time)" ON)
option(STOCHDEPTH_NEON "Compile the NEON kernels (aarch64)" ON)

set(_sd_src "${CMAKE_CURRENT_LIST_DIR}/../src/stochdepth")
cmake_path(NORMAL_PATH _sd_src)
set(STOCHDEPTH_CORE_SOURCES
    ${_sd_src}/drop_path.cc
    ${_sd_src}/params.cc
    ${_sd_src}/cpu_run.cc
    ${_sd_src}/thread_pool.cc
    ${_sd_src}/isa.cc
    ${_sd_src}/cpu_features.cc
    ${_sd_src}/cpu_scalar.cc
    ${_sd_src}/alloc.cc
    ${_sd_src}/norm.cc ${_sd_src}/norm_scalar.cc)

if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
  set(STOCHDEPTH_ARCH "x86_64")
elseif(CMAKE_SYSTEM_PROCESSOR MATCHES "^(aarch64|arm64|ARM64)$")
  set(STOCHDEPTH_ARCH "aarch64")
else()
  set(STOCHDEPTH_ARCH "${CMAKE_SYSTEM_PROCESSOR}")  # the scalar path only
endif()

set(_sd_avx2_flags -mavx2 -mfma -mf16c)
set(_sd_avx512_flags ${_sd_avx2_flags} -mavx512f -mavx512bw -mavx512dq -mavx512vl)
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
  # GCC 12's own AVX-512 headers trip -Wuninitialized (_mm512_undefined_* is `__m512i __Y = __Y`,
  # GCC bug 105593, fixed in 13); silenced for these units only, so -Werror builds still pass.
  list(APPEND _sd_avx512_flags -Wno-uninitialized)
endif()

# Adds the ISA units this architecture has to `target` (sources, flags, STOCHDEPTH_HAVE_<ISA>).
function(stochdepth_add_cpu_isas target)
  if(STOCHDEPTH_ARCH STREQUAL "x86_64" AND STOCHDEPTH_AVX2)
    target_sources(${target} PRIVATE ${_sd_src}/cpu_avx2.cc ${_sd_src}/norm_avx2.cc)
    set_source_files_properties(${_sd_src}/cpu_avx2.cc ${_sd_src}/norm_avx2.cc PROPERTIES
                                COMPILE_OPTIONS "${_sd_avx2_flags}")
    target_compile_definitions(${target} PRIVATE STOCHDEPTH_HAVE_AVX2=1)
  endif()
  if(STOCHDEPTH_ARCH STREQUAL "x86_64" AND STOCHDEPTH_AVX512)
    target_sources(${target} PRIVATE ${_sd_src}/cpu_avx512.cc ${_sd_src}/cpu_avx512_bf16.cc
                   ${_sd_src}/norm_avx512.cc)
    set_source_files_properties(${_sd_src}/cpu_avx512.cc ${_sd_src}/norm_avx512.cc PROPERTIES
                                COMPILE_OPTIONS "${_sd_avx512_flags}")
    set_source_files_properties(${_sd_src}/cpu_avx512_bf16.cc PROPERTIES
                                COMPILE_OPTIONS "${_sd_avx512_flags};-mavx512bf16")
    target_compile_definitions(${target} PRIVATE STOCHDEPTH_HAVE_AVX512=1)
  endif()
  if(STOCHDEPTH_ARCH STREQUAL "aarch64" AND STOCHDEPTH_NEON)
    target_sources(${target} PRIVATE ${_sd_src}/cpu_neon.cc ${_sd_src}/norm_neon.cc)
    target_compile_definitions(${target} PRIVATE STOCHDEPTH_HAVE_NEON=1)
  endif()
endfunction()
