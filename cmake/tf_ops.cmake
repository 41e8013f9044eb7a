# stochdepth/_tf_ops.so: the TensorFlow custom ops for stochdepth.tensorflow (src/ffi/tf_ops.cc),
# included by CMakeLists.txt after the _core target. Written against TensorFlow's C API for ops
# and kernels only; the headers and libtensorflow_framework.so.2 (where those C symbols live)
# come from the TensorFlow installed in the build environment. Nothing is vendored. An isolated
# `pip install .` has TensorFlow in its build environment only with STOCHDEPTH_TF=ON
# (pyproject.toml's override adds it to the build requirements): docs/install.md, "TensorFlow".
#   STOCHDEPTH_TF=AUTO (build it when TensorFlow is found), ON (required), OFF
set(STOCHDEPTH_TF "AUTO" CACHE STRING "Build the TensorFlow ops: AUTO (when TensorFlow is found), ON, OFF")
set_property(CACHE STOCHDEPTH_TF PROPERTY STRINGS AUTO ON OFF)
# The oldest TensorFlow whose C API has every entry the library uses (the kernel builder, the op
# definition builder, TF_ShapeInferenceContextSetOutput); python/stochdepth/tensorflow/_load.py
# states the same.
set(STOCHDEPTH_MIN_TF "2.16.0")

if(NOT STOCHDEPTH_TF MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "STOCHDEPTH_TF must be AUTO, ON or OFF, got '${STOCHDEPTH_TF}'")
endif()

if(NOT STOCHDEPTH_TF STREQUAL "OFF")
  # Found without importing tensorflow (seconds, and its start-up chatter): the package folder
  # and the version of the distribution that provides it (tensorflow, tensorflow-cpu, ...;
  # packages_distributions needs Python >= 3.10, as the TensorFlow releases supported do).
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import importlib.metadata as m, importlib.util as u; s = u.find_spec('tensorflow'); d = m.packages_distributions()['tensorflow'][0]; print(list(s.submodule_search_locations)[0] + ';' + m.version(d))"
    OUTPUT_VARIABLE _sd_tf OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _sd_rc)
  set(_sd_found OFF)
  if(_sd_rc EQUAL 0)
    list(GET _sd_tf 0 STOCHDEPTH_TF_DIR)
    list(GET _sd_tf 1 STOCHDEPTH_TF_VERSION)
    if(EXISTS "${STOCHDEPTH_TF_DIR}/include/tensorflow/c/kernels.h"
       AND EXISTS "${STOCHDEPTH_TF_DIR}/libtensorflow_framework.so.2"
       AND NOT STOCHDEPTH_TF_VERSION VERSION_LESS STOCHDEPTH_MIN_TF)
      set(_sd_found ON)
    endif()
  endif()
  if(_sd_found)
    # A plain shared library, not a Python extension: tf.load_op_library opens it.
    add_library(_tf_ops MODULE src/ffi/tf_ops.cc)
    set_target_properties(_tf_ops PROPERTIES PREFIX "" OUTPUT_NAME "_tf_ops" SUFFIX ".so")
    target_include_directories(_tf_ops PRIVATE src)
    # SYSTEM: TensorFlow's headers are not ours to warn about.
    target_include_directories(_tf_ops SYSTEM PRIVATE "${STOCHDEPTH_TF_DIR}/include")
    target_compile_definitions(_tf_ops PRIVATE
                               STOCHDEPTH_TF_BUILD_VERSION="${STOCHDEPTH_TF_VERSION}")
    # The C symbols of the kernel and op API; TensorFlow has loaded the library (by its soname)
    # before tf.load_op_library opens ours, so no rpath is needed.
    target_link_libraries(_tf_ops PRIVATE "${STOCHDEPTH_TF_DIR}/libtensorflow_framework.so.2")
    target_compile_options(_tf_ops PRIVATE -ffp-contract=off -fno-fast-math -Wall -Wextra)
    if(STOCHDEPTH_WERROR)
      target_compile_options(_tf_ops PRIVATE -Werror)
    endif()
    install(TARGETS _tf_ops LIBRARY DESTINATION stochdepth)
    message(STATUS "stochdepth: TensorFlow ops ON (TensorFlow ${STOCHDEPTH_TF_VERSION} C API)")
  elseif(STOCHDEPTH_TF STREQUAL "ON")
    message(FATAL_ERROR "STOCHDEPTH_TF=ON but no TensorFlow >= ${STOCHDEPTH_MIN_TF} with the C API "
                        "headers (include/tensorflow/c/kernels.h) and libtensorflow_framework.so.2 "
                        "is importable by ${Python_EXECUTABLE}.")
  else()
    message(STATUS "stochdepth: TensorFlow ops OFF (no TensorFlow >= ${STOCHDEPTH_MIN_TF} found)")
  endif()
else()
  message(STATUS "stochdepth: TensorFlow ops OFF (STOCHDEPTH_TF=OFF)")
endif()
