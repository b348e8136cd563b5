# consumer_test.cmake - installs the pynorm build tree into a fresh prefix,
# then configures, builds and runs tests/c/consumer (find_package(pynorm)
# + pynorm::pynorm) against that prefix only. Run with cmake -P:
#
#   cmake -DPN_BUILD_DIR=<pynorm build dir> -DPN_CONSUMER_SRC=<tests/c/consumer>
#         -DPN_WORK_DIR=<scratch dir> [-DPN_CONFIG=Release] [-DPN_GENERATOR=Ninja]
#         [-DPN_C_COMPILER=cc] [-DPN_C_FLAGS=...] [-DPN_LINKER_FLAGS=...]
#         -P consumer_test.cmake
cmake_minimum_required(VERSION 3.18)

foreach(var PN_BUILD_DIR PN_CONSUMER_SRC PN_WORK_DIR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "consumer_test.cmake: -D${var}=... is required")
  endif()
endforeach()
if(NOT DEFINED PN_CONFIG OR "${PN_CONFIG}" STREQUAL "")
  set(PN_CONFIG Release)
endif()

set(prefix "${PN_WORK_DIR}/prefix")
set(build "${PN_WORK_DIR}/build")
file(REMOVE_RECURSE "${PN_WORK_DIR}")
file(MAKE_DIRECTORY "${PN_WORK_DIR}")

function(run_step name)
  execute_process(COMMAND ${ARGN}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message(STATUS "[${name}] ${out}${err}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer test: step '${name}' failed (exit ${rc})")
  endif()
endfunction()

# 1. install
run_step(install "${CMAKE_COMMAND}" --install "${PN_BUILD_DIR}" --prefix "${prefix}"
         --config "${PN_CONFIG}")
foreach(f include/pynorm.h)
  if(NOT EXISTS "${prefix}/${f}")
    message(FATAL_ERROR "consumer test: ${prefix}/${f} was not installed")
  endif()
endforeach()
file(GLOB_RECURSE configs "${prefix}/*/pynormConfig.cmake" "${prefix}/*/pynorm-config.cmake")
if(NOT configs)
  message(FATAL_ERROR "consumer test: no pynormConfig.cmake under ${prefix}")
endif()
message(STATUS "installed package file(s): ${configs}")

# 2. configure the consumer against the prefix only (no package registry,
#    no build tree)
set(cfg_args -S "${PN_CONSUMER_SRC}" -B "${build}"
    "-DCMAKE_PREFIX_PATH=${prefix}"
    "-DCMAKE_BUILD_TYPE=${PN_CONFIG}"
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
    -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON)
if(DEFINED PN_GENERATOR AND NOT "${PN_GENERATOR}" STREQUAL "")
  list(APPEND cfg_args -G "${PN_GENERATOR}")
endif()
if(DEFINED PN_C_COMPILER AND NOT "${PN_C_COMPILER}" STREQUAL "")
  list(APPEND cfg_args "-DCMAKE_C_COMPILER=${PN_C_COMPILER}")
endif()
if(DEFINED PN_C_FLAGS AND NOT "${PN_C_FLAGS}" STREQUAL "")
  list(APPEND cfg_args "-DCMAKE_C_FLAGS=${PN_C_FLAGS}")
endif()
if(DEFINED PN_LINKER_FLAGS AND NOT "${PN_LINKER_FLAGS}" STREQUAL "")
  list(APPEND cfg_args "-DCMAKE_EXE_LINKER_FLAGS=${PN_LINKER_FLAGS}")
endif()
run_step(configure "${CMAKE_COMMAND}" ${cfg_args})

# the package must have come from the prefix
file(STRINGS "${build}/CMakeCache.txt" dirline REGEX "^pynorm_DIR:")
string(REGEX REPLACE "^pynorm_DIR:[A-Z]*=" "" pynorm_dir "${dirline}")
get_filename_component(pynorm_dir "${pynorm_dir}" REALPATH)
get_filename_component(prefix_real "${prefix}" REALPATH)
string(FIND "${pynorm_dir}" "${prefix_real}/" at)
if(NOT at EQUAL 0)
  message(FATAL_ERROR "consumer test: pynorm_DIR=${pynorm_dir} is not under the install prefix ${prefix_real}")
endif()
message(STATUS "pynorm_DIR=${pynorm_dir}")

# 3. build
run_step(build "${CMAKE_COMMAND}" --build "${build}" --config "${PN_CONFIG}")

# 4. run (the shared library from the prefix: RPATH from CMake, and
#    LD_LIBRARY_PATH in case the package does not carry a full path)
set(app "${build}/app")
if(NOT EXISTS "${app}" AND EXISTS "${build}/${PN_CONFIG}/app")
  set(app "${build}/${PN_CONFIG}/app")
endif()
set(libpath "${prefix}/lib")
if(EXISTS "${prefix}/lib64")
  string(APPEND libpath ":${prefix}/lib64")
endif()
if(DEFINED ENV{LD_LIBRARY_PATH} AND NOT "$ENV{LD_LIBRARY_PATH}" STREQUAL "")
  string(APPEND libpath ":$ENV{LD_LIBRARY_PATH}")
endif()
run_step(run "${CMAKE_COMMAND}" -E env "LD_LIBRARY_PATH=${libpath}" "${app}")

# 5. the app linked the installed library, not the build tree's
if(CMAKE_HOST_UNIX AND NOT APPLE)
  find_program(LDD ldd)
  if(LDD)
    execute_process(COMMAND "${CMAKE_COMMAND}" -E env "LD_LIBRARY_PATH=${libpath}" "${LDD}" "${app}"
                    OUTPUT_VARIABLE ldd_out RESULT_VARIABLE ldd_rc)
    string(REGEX MATCH "libpynorm[^ ]* => [^ ]+" ldd_line "${ldd_out}")
    message(STATUS "ldd: ${ldd_line}")
    if(ldd_line AND NOT ldd_line MATCHES "${prefix_real}|${prefix}")
      message(FATAL_ERROR "consumer test: app resolved ${ldd_line}, not the installed library")
    endif()
  endif()
endif()
# 6. the static library, when the package has it
set(app_static "${build}/app_static")
if(NOT EXISTS "${app_static}" AND EXISTS "${build}/${PN_CONFIG}/app_static")
  set(app_static "${build}/${PN_CONFIG}/app_static")
endif()
if(EXISTS "${app_static}")
  run_step(run_static "${app_static}")
else()
  message(STATUS "no app_static (the package has no pynorm::pynorm_static)")
endif()
message(STATUS "consumer test passed")
