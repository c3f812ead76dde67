/*
 * her2scope → QuPath: import a FOV's counted cells, tumour region and ROI onto its OME-TIFF.
 *
 * For QuPath 0.4 or later. A case folder written by `her2scope record` (or `her2scope export CASE_DIR`) holds, in
 * qupath/, one fov-NNN.ome.tif (the field, calibrated in µm) and one fov-NNN.geojson (its objects) per FOV.
 *
 * How to run it:
 *   1. File → Project... → Create project (an empty folder), then Add images: the case's qupath/*.ome.tif
 *      (image type: Brightfield (H-DAB)). Each image opens calibrated: Image tab, Pixel width/height in µm.
 *   2. Automate → Script editor, File → Open... this script.
 *   3. Run → Run (the image open in the viewer), or Run → Run for project (every image of the project).
 * Each image gets the objects of the .geojson beside its .ome.tif: every counted cell classified 0 / 1+ / 2+ / 3+
 * with its measurements (Measure → Show detection measurements), the tumour region and the ROI as locked
 * annotations. Running it again replaces what an earlier run imported; objects drawn by hand are kept.
 */

import qupath.lib.io.PathIO

def server = getCurrentServer()
def uris = server.getURIs()
if (uris.isEmpty()) {
    println "The image has no file: open a her2scope fov-NNN.ome.tif"
    return
}
def imageFile = new File(uris[0])
def stem = imageFile.getName().replaceFirst(/(?i)\.ome\.tiff?$/, '')
def geojson = new File(imageFile.getParentFile(), stem + '.geojson')
if (!geojson.isFile()) {
    println "No ${geojson.getName()} beside ${imageFile.getName()}: nothing imported"
    return
}

// her2scope's objects carry its names: remove those of an earlier import, keep everything else
def earlier = getAllObjects(false).findAll {
    it.isCell() || it.isDetection() || it.getName() in ['ROI', 'Tumour region (cells counted)']
}
removeObjects(earlier, false)

def objects = PathIO.readObjects(geojson)
addObjects(objects)
resolveHierarchy()

def cells = objects.findAll { it.isDetection() }
def counts = ['0', '1+', '2+', '3+'].collectEntries { name -> [name, cells.count { it.getPathClass()?.getName() == name }] }
println "${imageFile.getName()}: ${cells.size()} cells ${counts}, ${objects.size() - cells.size()} annotations " +
        "from ${geojson.getName()}; pixel size ${server.getPixelCalibration().getAveragedPixelSizeMicrons()} µm"
