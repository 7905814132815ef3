"""Reference geometry a run is mapped onto: template grids, labelled atlases, surface meshes."""
