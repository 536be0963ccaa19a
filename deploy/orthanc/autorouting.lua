-- CalciMap auto-routing for Orthanc (tested by tests/test_pacs_dimse.py against Orthanc 1.10).
--
-- Every CT series that becomes stable (no new instance for Orthanc's "StableAge" seconds) is sent by C-STORE to
-- the CalciMap bridge's SCP (`python -m deploy_app.pacs dimse serve`), which runs the app once the whole study
-- has arrived and C-STOREs SEG, SR and the PDF report back into the same study in Orthanc.
--
-- In Orthanc's configuration:
--   "LuaScripts": [ "/etc/orthanc/calcimap-autorouting.lua" ],
--   "DicomModalities": { "calcimap": { "AET": "CALCIMAP", "Host": "bridge-host", "Port": 11112 } }
-- The bridge's own AE title must be registered there too (it is the same entry), or Orthanc refuses its results
-- when "DicomAlwaysAllowStore" is off.
--
-- Only CT series are routed: CalciMap's results (SEG, SR, DOC), stored back into the study, never go round again.
-- The store runs as an asynchronous Orthanc job: if the bridge is down the job fails and can be resubmitted from
-- Orthanc's /jobs API. Log lines carry Orthanc's resource IDs only, no patient data.

CALCIMAP_MODALITY = 'calcimap'

function OnStableSeries(seriesId, tags, metadata)
   if tags['Modality'] == 'CT' then
      print('CalciMap auto-routing: sending CT series ' .. seriesId .. ' to ' .. CALCIMAP_MODALITY)
      RestApiPost('/modalities/' .. CALCIMAP_MODALITY .. '/store',
                  '{"Resources": ["' .. seriesId .. '"], "Synchronous": false}')
   end
end
