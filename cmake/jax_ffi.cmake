# stochdepth._jax_ffi: the XLA FFI handlers for stochdepth.jax (src/ffi/jax_ffi.cc; the fused
# norm's in src/ffi/jax_norm_ffi.cc), included
# by CMakeLists.txt after the _core target. The XLA FFI headers come from the jaxlib installed
# in the build environment (a build requirement in pyproject.toml); nothing is vendored.
#   STOCHDEPTH_JAX=AUTO (build it when jaxlib's headers are found), ON (required), OFF
set(STOCHDEPTH_JAX "AUTO" CACHE STRING "Build the JAX FFI module: AUTO (when jaxlib is found), ON, OFF")
set_property(CACHE STOCHDEPTH_JAX PROPERTY STRINGS AUTO ON OFF)
# The oldest jaxlib whose headers and runtime the module is written for (jax.ffi with
# vmap_method, the typed FFI with DeviceOrdinal); python/stochdepth/jax/_ffi.py checks it too.
set(STOCHDEPTH_MIN_JAXLIB "0.5.0")

if(NOT STOCHDEPTH_JAX MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "STOCHDEPTH_JAX must be AUTO, ON or OFF, got '${STOCHDEPTH_JAX}'")
endif()

if(NOT STOCHDEPTH_JAX STREQUAL "OFF")
  # Found without importing jaxlib (no numpy/scipy import at configure time).
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import importlib.metadata as m, importlib.util as u, os; s = u.find_spec('jaxlib'); print(os.path.join(list(s.submodule_search_locations)[0], 'include') + ';' + m.version('jaxlib'))"
    OUTPUT_VARIABLE _sd_jaxlib OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _sd_rc)
  set(_sd_found OFF)
  if(_sd_rc EQUAL 0)
    list(GET _sd_jaxlib 0 STOCHDEPTH_JAX_INCLUDE)
    list(GET _sd_jaxlib 1 STOCHDEPTH_JAXLIB_VERSION)
    if(EXISTS "${STOCHDEPTH_JAX_INCLUDE}/xla/ffi/api/ffi.h"
       AND NOT STOCHDEPTH_JAXLIB_VERSION VERSION_LESS STOCHDEPTH_MIN_JAXLIB)
      set(_sd_found ON)
    endif()
  endif()
  if(_sd_found)
    python_add_library(_jax_ffi MODULE src/ffi/jax_ffi.cc src/ffi/jax_norm_ffi.cc WITH_SOABI)
    target_link_libraries(_jax_ffi PRIVATE pybind11::headers)
    # SYSTEM: jaxlib's headers are not ours to warn about.
    target_include_directories(_jax_ffi PRIVATE src)
    target_include_directories(_jax_ffi SYSTEM PRIVATE "${STOCHDEPTH_JAX_INCLUDE}")
    target_compile_definitions(_jax_ffi PRIVATE
                               STOCHDEPTH_JAXLIB_BUILD_VERSION="${STOCHDEPTH_JAXLIB_VERSION}")
    # The CUDA handlers (platform "CUDA") exist when the core has CUDA. They reach the kernels
    # through _core's entry table and take XLA's stream as a void*: no CUDA header or library.
    if(STOCHDEPTH_WITH_CUDA)
      target_compile_definitions(_jax_ffi PRIVATE STOCHDEPTH_JAX_CUDA=1)
    else()
      target_compile_definitions(_jax_ffi PRIVATE STOCHDEPTH_JAX_CUDA=0)
    endif()
    target_compile_options(_jax_ffi PRIVATE -ffp-contract=off -fno-fast-math -Wall -Wextra)
    if(STOCHDEPTH_WERROR)
      target_compile_options(_jax_ffi PRIVATE -Werror)
    endif()
    install(TARGETS _jax_ffi LIBRARY DESTINATION stochdepth)
    message(STATUS "stochdepth: JAX FFI module ON (jaxlib ${STOCHDEPTH_JAXLIB_VERSION} headers, "
                   "CUDA targets ${STOCHDEPTH_WITH_CUDA})")
  elseif(STOCHDEPTH_JAX STREQUAL "ON")
    message(FATAL_ERROR "STOCHDEPTH_JAX=ON but no jaxlib >= ${STOCHDEPTH_MIN_JAXLIB} with the XLA "
                        "FFI headers (include/xla/ffi/api/ffi.h) is importable by ${Python_EXECUTABLE}.")
  else()
    message(STATUS "stochdepth: JAX FFI module OFF (no jaxlib >= ${STOCHDEPTH_MIN_JAXLIB} found)")
  endif()
else()
  message(STATUS "stochdepth: JAX FFI module OFF (STOCHDEPTH_JAX=OFF)")
endif()
