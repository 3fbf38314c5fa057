@echo off
rem Flux LoRA Studio launcher (Windows). Double-click it to start the app, or from a terminal:
rem   launch.bat [app flags]      start the app (flags go to app.py: --port, --listen, --share, --auth, --allow)
rem   launch.bat --test [args]    run the tests (extra args go to pytest)
rem
rem First run: creates .venv beside this file and installs requirements.txt (+ requirements-test.txt).
rem With an NVIDIA GPU (nvidia-smi -L works), torch is installed first from the PyTorch CUDA 12.8 index,
rem so that pip keeps that build instead of the CPU wheel.
rem .venv\.requirements.sha256 records what was installed (same hash as launch.sh); while it matches,
rem later runs start at once. It is written only after a successful install.
setlocal EnableExtensions DisableDelayedExpansion

cd /d "%~dp0"
if errorlevel 1 (
    set "ERR=cannot enter the folder of launch.bat"
    goto fail
)

set "VENV=.venv"
set "VENV_PY=.venv\Scripts\python.exe"
set "CUDA_INDEX=https://download.pytorch.org/whl/cu128"
set "REQ_ARGS=-r requirements.txt"
if exist requirements-test.txt set "REQ_ARGS=-r requirements.txt -r requirements-test.txt"
rem Python code shared by the marker check and the marker write: d = sha256 of the requirement files.
set "HASH_PY=import hashlib, os, sys; h = hashlib.sha256(); [h.update(open(f, 'rb').read()) for f in ('requirements.txt', 'requirements-test.txt') if os.path.exists(f)]; d = h.hexdigest(); m = os.path.join('.venv', '.requirements.sha256')"

if not exist requirements.txt (
    set "ERR=requirements.txt not found in %CD%"
    goto fail
)

rem ---- fast path: .venv exists and its marker matches the requirement files ----
if not exist "%VENV_PY%" goto install
"%VENV_PY%" -c "%HASH_PY%; sys.exit(not os.path.exists(m) or open(m).read().strip() != d)" >nul 2>nul
if errorlevel 1 goto install
goto ready

rem ---- first run, or the requirements changed ----
:install
if exist "%VENV_PY%" (
    "%VENV_PY%" -c "pass" >nul 2>nul
    if not errorlevel 1 goto venv_ok
)
call :find_python
if not defined PY (
    set "ERR=Python 3.10 or newer is needed; install it from python.org with 'Add python.exe to PATH' ticked, then run launch.bat again"
    goto fail
)
if exist "%VENV%\" (
    echo launch.bat: %VENV% has no working python; creating it again with %PY%
    %PY% -m venv --clear "%VENV%"
) else (
    echo launch.bat: creating %VENV% with %PY%
    %PY% -m venv "%VENV%"
)
if errorlevel 1 (
    rmdir /s /q "%VENV%" >nul 2>nul
    set "ERR=could not create %VENV% with %PY%"
    goto fail
)

:venv_ok
"%VENV_PY%" -c "import sys; sys.exit(sys.version_info < (3, 10))" >nul 2>nul
if errorlevel 1 (
    set "ERR=%VENV_PY% does not run or is older than Python 3.10; delete the %VENV% folder and run launch.bat again"
    goto fail
)
if exist "%VENV%\.requirements.sha256" del /f /q "%VENV%\.requirements.sha256"
set "PIP_FLAGS=--disable-pip-version-check"
if defined CI set "PIP_FLAGS=--disable-pip-version-check --progress-bar off"

set "HAS_NVIDIA="
where nvidia-smi >nul 2>nul
if not errorlevel 1 (
    nvidia-smi -L >nul 2>nul
    if not errorlevel 1 set "HAS_NVIDIA=1"
)
if not defined HAS_NVIDIA goto install_requirements
rem The torch pin comes from requirements.txt; a CUDA build such as 2.13.0+cu128 satisfies torch==2.13.0.
set "TORCH_SPEC=torch==2.13.0"
for /f "usebackq tokens=1" %%L in (`findstr /b /i /c:"torch==" requirements.txt`) do set "TORCH_SPEC=%%L"
echo launch.bat: NVIDIA GPU found; installing %TORCH_SPEC% from %CUDA_INDEX%
"%VENV_PY%" -m pip install %PIP_FLAGS% "%TORCH_SPEC%" --index-url %CUDA_INDEX%
if errorlevel 1 (
    set "ERR=pip could not install %TORCH_SPEC% from %CUDA_INDEX%; see the messages above, then run launch.bat again"
    goto fail
)

:install_requirements
echo launch.bat: pip install %REQ_ARGS% - the first time takes a few minutes
"%VENV_PY%" -m pip install %PIP_FLAGS% %REQ_ARGS%
if errorlevel 1 (
    set "ERR=pip could not install %REQ_ARGS%; see the messages above, then run launch.bat again"
    goto fail
)
"%VENV_PY%" -c "%HASH_PY%; open(m, 'w').write(d + '\n')"
if errorlevel 1 (
    set "ERR=could not write %VENV%\.requirements.sha256"
    goto fail
)
echo launch.bat: requirements installed

rem ---- run ----
:ready
if /i "%~1"=="--test" goto test
if not exist app.py (
    set "ERR=app.py not found in %CD%"
    goto fail
)
"%VENV_PY%" app.py %*
set "APP_RC=%ERRORLEVEL%"
rem 0: normal exit; -1073741510 (0xC000013A): the window was closed or Ctrl+C was pressed.
if "%APP_RC%"=="0" exit /b 0
if "%APP_RC%"=="-1073741510" exit /b 0
set "ERR=app.py stopped with exit code %APP_RC%; see the messages above"
goto fail

:test
"%VENV_PY%" -c "import pytest" >nul 2>nul
if errorlevel 1 (
    set "ERR=pytest is not installed in %VENV%; is requirements-test.txt missing?"
    goto fail
)
rem Everything after --test goes to pytest.
set "TEST_ARGS="
:collect_test_args
shift
if "%~1"=="" goto run_tests
set "TEST_ARGS=%TEST_ARGS% %1"
goto collect_test_args
:run_tests
"%VENV_PY%" -m pytest -q tests%TEST_ARGS%
exit /b %ERRORLEVEL%

rem ---- helpers ----
:find_python
rem Sets PY to "py -3" or "python", whichever runs and is Python 3.10 or newer; leaves it empty if none.
set "PY="
where py >nul 2>nul
if not errorlevel 1 (
    py -3 -c "import sys; sys.exit(sys.version_info < (3, 10))" >nul 2>nul
    if not errorlevel 1 set "PY=py -3"
)
if defined PY exit /b 0
python -c "import sys; sys.exit(sys.version_info < (3, 10))" >nul 2>nul
if not errorlevel 1 set "PY=python"
exit /b 0

:fail
echo launch.bat: error: %ERR% 1>&2
if not defined CI pause
exit /b 1
