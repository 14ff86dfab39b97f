//! Embeds the path of the libpython the server was built against, so the binary runs without
//! LD_LIBRARY_PATH (pyenv and venv Pythons keep libpython outside the loader's default path).
fn main() {
    pyo3_build_config::add_libpython_rpath_link_args();
}
