# Finds libtorch (from the installed Python torch unless Torch_DIR is set), zlib,
# nlohmann-json, MPI and NCCL, and resolves SMP_USE_NCCL=AUTO to ON or OFF.

find_package(Python COMPONENTS Interpreter REQUIRED)

if(NOT Torch_DIR)
  execute_process(
    COMMAND ${Python_EXECUTABLE} -c "import torch; print(torch.utils.cmake_prefix_path)"
    OUTPUT_VARIABLE _smp_torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _smp_torch_rc)
  if(NOT _smp_torch_rc EQUAL 0)
    message(FATAL_ERROR "smp needs PyTorch: 'import torch' failed in ${Python_EXECUTABLE}. "
      "Install torch (pip install torch) or set Torch_DIR to libtorch's cmake folder.")
  endif()
  list(APPEND CMAKE_PREFIX_PATH "${_smp_torch_prefix}")
endif()
find_package(Torch REQUIRED)
find_package(ZLIB REQUIRED)
# nlohmann-json (header-only; Debian nlohmann-json3-dev): the checkpoint index,
# the manifest and SM_HP_MP_PARAMETERS are parsed with it. Its CMake package,
# or else the bare header (a .deb unpacked with dpkg -x: add its usr/ to
# CMAKE_PREFIX_PATH).
find_package(nlohmann_json 3 CONFIG QUIET)
if(NOT TARGET nlohmann_json::nlohmann_json)
  find_path(SMP_NLOHMANN_JSON_INCLUDE_DIR nlohmann/json.hpp)
  if(NOT SMP_NLOHMANN_JSON_INCLUDE_DIR)
    message(FATAL_ERROR "smp needs nlohmann-json (header nlohmann/json.hpp): install the Debian "
      "package nlohmann-json3-dev (apt-get install nlohmann-json3-dev, or dpkg -i its .deb), or "
      "set nlohmann_json_DIR / CMAKE_PREFIX_PATH to where it is.")
  endif()
  add_library(nlohmann_json::nlohmann_json INTERFACE IMPORTED)
  set_target_properties(nlohmann_json::nlohmann_json PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${SMP_NLOHMANN_JSON_INCLUDE_DIR}")
endif()
find_library(TORCH_PYTHON_LIBRARY torch_python PATHS "${TORCH_INSTALL_PREFIX}/lib" NO_DEFAULT_PATH)

if(SMP_USE_MPI)
  find_package(MPI REQUIRED COMPONENTS C)
  # C API only: keep OpenMPI/MPICH headers from pulling in their C++ bindings,
  # which C++ files that include mpi.h would otherwise need to link.
  set_property(TARGET MPI::MPI_C APPEND PROPERTY INTERFACE_COMPILE_DEFINITIONS
    OMPI_SKIP_MPICXX=1 MPICH_SKIP_MPICXX=1)
endif()

# NCCL: wanted when torch was built with CUDA.
set(_smp_torch_cuda OFF)
if(TARGET torch_cuda OR CUDA_FOUND OR TARGET CUDA::cudart)
  set(_smp_torch_cuda ON)
endif()
if(SMP_USE_NCCL STREQUAL "AUTO" OR SMP_USE_NCCL)
  if(_smp_torch_cuda)
    find_package(CUDAToolkit)
    execute_process(
      COMMAND ${Python_EXECUTABLE} -c "import nvidia.nccl, os; print(list(nvidia.nccl.__path__)[0])"
      OUTPUT_VARIABLE _smp_py_nccl OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    find_path(NCCL_INCLUDE_DIR nccl.h
      HINTS $ENV{NCCL_ROOT}/include ${NCCL_ROOT}/include ${_smp_py_nccl}/include)
    find_library(NCCL_LIBRARY NAMES nccl libnccl.so.2
      HINTS $ENV{NCCL_ROOT}/lib ${NCCL_ROOT}/lib ${_smp_py_nccl}/lib)
  endif()
  if(NCCL_INCLUDE_DIR AND NCCL_LIBRARY AND CUDAToolkit_FOUND)
    set(SMP_USE_NCCL ON)
    add_library(smp_nccl INTERFACE)
    target_include_directories(smp_nccl INTERFACE ${NCCL_INCLUDE_DIR})
    target_link_libraries(smp_nccl INTERFACE ${NCCL_LIBRARY})
    message(STATUS "smp: NCCL backend ON (${NCCL_INCLUDE_DIR}, ${NCCL_LIBRARY})")
  elseif(SMP_USE_NCCL STREQUAL "AUTO")
    set(SMP_USE_NCCL OFF)
    message(STATUS "smp: NCCL backend OFF (torch without CUDA, or nccl.h not found)")
  else()
    message(FATAL_ERROR "SMP_USE_NCCL=ON but torch has no CUDA or NCCL was not found; set NCCL_ROOT")
  endif()
else()
  set(SMP_USE_NCCL OFF)
endif()
